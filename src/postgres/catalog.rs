//! What the server says about itself: the facts a backup needs to decide what to snapshot
//! and to describe the backup in its status.

use tokio_postgres::Client;

use super::error::{Error, Step};

/// PostgreSQL 10 is the first major with `pg_create_physical_replication_slot(.., true,
/// true)`, `wait_for_archive` and the `pg_wal` naming; older servers are refused.
pub const MIN_MAJOR: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    /// Absolute path the `pg_tblspc/<oid>` link points to.
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    pub superuser: bool,
    /// May create replication slots (needed to pin WAL).
    pub replication: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 160004.
    pub version_num: u32,
    /// `server_version`, e.g. "16.4".
    pub version: String,
    pub major: u32,
    pub in_recovery: bool,
    pub system_identifier: u64,
    /// Primary: the timeline it writes. Standby: the timeline of its last restartpoint.
    pub timeline: u32,
    pub data_directory: String,
    /// `data_directory/pg_wal`, which may be a link to another volume: see
    /// [`Session::locate_wal`](super::Session::locate_wal).
    pub wal_directory: String,
    pub wal_segment_size: u64,
    pub tablespaces: Vec<Tablespace>,
    pub archive_mode: String,
    /// `archive_command`, or on 15+ `archive_library` when that is what archives; empty
    /// when nothing does.
    pub archiver: String,
    pub wal_level: String,
    pub full_page_writes: bool,
    pub role: RoleInfo,
}

impl ServerInfo {
    pub(crate) async fn load(client: &Client) -> Result<ServerInfo, Error> {
        let facts = read_facts(client).await?;
        let user = &facts.user;
        let role = read_role(client, user).await?;
        let data_directory = read_data_directory(client, user).await?;
        let system_identifier = read_system_identifier(client, user).await?;
        let timeline = if facts.in_recovery {
            read_checkpoint_timeline(client, user).await?
        } else {
            read_current_timeline(client, user).await?
        };
        let wal_segment_size = read_wal_segment_size(client, user).await?;
        let tablespaces = read_tablespaces(client, user).await?;
        let archiver = read_archiver(client, user, facts.version_num).await?;
        Ok(ServerInfo {
            version_num: facts.version_num,
            version: facts.version,
            major: major_of(facts.version_num),
            in_recovery: facts.in_recovery,
            system_identifier,
            timeline,
            wal_directory: format!("{data_directory}/pg_wal"),
            data_directory,
            wal_segment_size,
            tablespaces,
            archive_mode: facts.archive_mode,
            archiver,
            wal_level: facts.wal_level,
            full_page_writes: facts.full_page_writes,
            role,
        })
    }
}

/// What any role may read about the server and itself, in one round trip.
struct ServerFacts {
    version_num: u32,
    version: String,
    in_recovery: bool,
    user: String,
    wal_level: String,
    archive_mode: String,
    full_page_writes: bool,
}

async fn read_facts(client: &Client) -> Result<ServerFacts, Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int4, \
                    current_setting('server_version'), \
                    pg_is_in_recovery(), current_user::text, \
                    current_setting('wal_level'), current_setting('archive_mode'), \
                    current_setting('full_page_writes')::bool",
            &[],
        )
        .await
        .map_err(|e| query_err("reading the server version", "", e))?;
    let version_num = row.get::<_, i32>(0) as u32;
    let version: String = row.get(1);
    check_version(version_num, &version)?;
    Ok(ServerFacts {
        version_num,
        version,
        in_recovery: row.get(2),
        user: row.get(3),
        wal_level: row.get(4),
        archive_mode: row.get(5),
        full_page_writes: row.get(6),
    })
}

async fn read_role(client: &Client, user: &str) -> Result<RoleInfo, Error> {
    let row = client
        .query_one(
            "select rolsuper, rolreplication from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| query_err("reading the role's attributes", user, e))?;
    Ok(RoleInfo {
        name: user.to_string(),
        superuser: row.get(0),
        replication: row.get(1),
    })
}

async fn read_data_directory(client: &Client, user: &str) -> Result<String, Error> {
    Ok(client
        .query_one("select current_setting('data_directory')", &[])
        .await
        .map_err(|e| {
            query_err("reading data_directory", user, e)
                .with_grant(|| format!("GRANT pg_read_all_settings TO {}", quote_ident(user)))
        })?
        .get(0))
}

/// What archives WAL: the command, or on 15+ the library when no command is set.
async fn read_archiver(client: &Client, user: &str, version_num: u32) -> Result<String, Error> {
    let sql = if major_of(version_num) >= 15 {
        "select coalesce(nullif(current_setting('archive_command'), ''), current_setting('archive_library'))"
    } else {
        "select current_setting('archive_command')"
    };
    Ok(client
        .query_one(sql, &[])
        .await
        .map_err(|e| {
            query_err("reading archive_command", user, e)
                .with_grant(|| format!("GRANT pg_read_all_settings TO {}", quote_ident(user)))
        })?
        .get(0))
}

async fn read_system_identifier(client: &Client, user: &str) -> Result<u64, Error> {
    Ok(client
        .query_one("select system_identifier from pg_control_system()", &[])
        .await
        .map_err(|e| {
            query_err("reading the system identifier", user, e).with_grant(|| {
                format!(
                    "GRANT EXECUTE ON FUNCTION pg_control_system() TO {}",
                    quote_ident(user)
                )
            })
        })?
        .get::<_, i64>(0) as u64)
}

/// A standby's timeline: the one of its last restartpoint.
async fn read_checkpoint_timeline(client: &Client, user: &str) -> Result<u32, Error> {
    Ok(client
        .query_one("select timeline_id from pg_control_checkpoint()", &[])
        .await
        .map_err(|e| {
            query_err("reading the timeline", user, e).with_grant(|| {
                format!(
                    "GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO {}",
                    quote_ident(user)
                )
            })
        })?
        .get::<_, i32>(0) as u32)
}

/// A primary's timeline. The last checkpoint's lags behind a promotion until the next
/// checkpoint; the current WAL file's name does not.
async fn read_current_timeline(client: &Client, user: &str) -> Result<u32, Error> {
    let file: String = client
        .query_one("select pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .map_err(|e| query_err("reading the timeline", user, e))?
        .get(0);
    timeline_of_wal_file(&file)
}

fn timeline_of_wal_file(file: &str) -> Result<u32, Error> {
    u32::from_str_radix(file.get(..8).unwrap_or(""), 16).map_err(|_| Error::Query {
        what: "reading the timeline",
        detail: format!("unexpected WAL file name {file:?}"),
        sqlstate: None,
    })
}

async fn read_wal_segment_size(client: &Client, user: &str) -> Result<u64, Error> {
    // PostgreSQL 10 reports the size in 8kB blocks, 11+ in bytes.
    Ok(client
        .query_one(
            "select setting::int8 * case unit when '8kB' then 8192 when 'MB' then 1048576 else 1 end \
             from pg_settings where name = 'wal_segment_size'",
            &[],
        )
        .await
        .map_err(|e| query_err("reading wal_segment_size", user, e))?
        .get::<_, i64>(0) as u64)
}

async fn read_tablespaces(client: &Client, user: &str) -> Result<Vec<Tablespace>, Error> {
    Ok(client
        .query(
            "select oid, spcname::text, pg_tablespace_location(oid) from pg_tablespace \
             where spcname not in ('pg_default', 'pg_global') order by oid",
            &[],
        )
        .await
        .map_err(|e| query_err("listing tablespaces", user, e))?
        .into_iter()
        .map(|r| Tablespace {
            oid: r.get(0),
            name: r.get(1),
            location: r.get(2),
        })
        .collect())
}

/// 160004 -> 16. Before 10 a major had two parts (9.6 is 90600); those all map to 9,
/// which is all the version check needs.
pub(crate) fn major_of(version_num: u32) -> u32 {
    version_num / 10_000
}

pub(crate) fn check_version(version_num: u32, version: &str) -> Result<(), Error> {
    if major_of(version_num) < MIN_MAJOR {
        return Err(Error::UnsupportedVersion {
            version: version.to_string(),
        });
    }
    Ok(())
}

/// A role name as it must appear in a GRANT statement.
pub fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn query_err(what: &'static str, user: &str, e: tokio_postgres::Error) -> Error {
    Error::from_query(what, Step::Connect, user, String::new, e)
}

impl Error {
    fn with_grant(self, grant: impl FnOnce() -> String) -> Error {
        match self {
            Error::MissingPrivilege { user, missing, .. } => Error::MissingPrivilege {
                user,
                missing,
                grant: grant(),
            },
            other => other,
        }
    }
}

/// Whether `candidate` is the directory `pg_wal` leads to. SQL has no readlink, and the
/// file functions canonicalize `..` away, so the link cannot be followed; but a directory
/// can be recognised: same entries (WAL segment names are unique to a cluster and moment)
/// and same modification and change times, read in one statement.
pub(crate) async fn is_wal_directory(
    client: &Client,
    candidate: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "with w as (select array_agg(f order by f) as files, \
                               (select (s.modification, s.change)::text from pg_stat_file('pg_wal', true) s) as stat \
                        from pg_ls_dir('pg_wal', true, false) f), \
                  c as (select array_agg(f order by f) as files, \
                               (select (s.modification, s.change)::text from pg_stat_file($1, true) s where s.isdir) as stat \
                        from pg_ls_dir($1, true, false) f) \
             select coalesce(w.files = c.files and w.stat = c.stat, false) from w, c",
            &[&candidate],
        )
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(major_of(100023), 10);
        assert_eq!(major_of(180004), 18);
        assert_eq!(major_of(90624), 9);
        assert!(check_version(100000, "10.0").is_ok());
        let e = check_version(90624, "9.6.24").unwrap_err();
        assert_eq!(e.reason(), "UnsupportedVersion");
        assert!(e.to_string().contains("9.6.24"));
    }

    #[test]
    fn timeline_from_the_wal_file_name() {
        assert_eq!(
            timeline_of_wal_file("0000000A0000000000000003").unwrap(),
            10
        );
        let e = timeline_of_wal_file("x").unwrap_err();
        assert_eq!(e.reason(), "Query");
        assert!(
            e.to_string().contains("unexpected WAL file name \"x\""),
            "{e}"
        );
    }

    #[test]
    fn quotes_role_names_for_grants() {
        assert_eq!(quote_ident("pgsnap"), "pgsnap");
        assert_eq!(quote_ident("Backup"), "\"Backup\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("9x"), "\"9x\"");
    }
}
