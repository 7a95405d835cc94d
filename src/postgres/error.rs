//! The failures of a backup session, each with a stable reason a controller can put into
//! `status.error.reason` and a message a user can act on. No message ever carries the
//! password: none is built from the connection options' password or from a connection
//! string.

use std::fmt;
use std::time::Duration;

use super::label::LabelError;

/// The step of a backup in which something happened; named in deadline and lost-session
/// errors so the user knows what was slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    /// `pg_backup_start`: waits for the checkpoint.
    Start,
    /// Between start and stop: the volumes are being snapshotted.
    InBackup,
    /// `pg_backup_stop`: waits for the WAL archive when asked to.
    Stop,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Start => "start (waiting for the checkpoint)",
            Step::InBackup => "backup mode (between start and stop, while snapshotting)",
            Step::Stop => "stop (waiting for WAL to be archived)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach PostgreSQL at {target}: {detail}")]
    Unreachable { target: String, detail: String },

    #[error(
        "PostgreSQL at {target} refused the login of role \"{user}\": {detail}; check the password Secret and pg_hba.conf"
    )]
    AuthenticationFailed {
        target: String,
        user: String,
        detail: String,
    },

    #[error("TLS with PostgreSQL at {target} failed: {detail}")]
    Tls { target: String, detail: String },

    #[error("role \"{user}\" {missing}; as a superuser run: {grant}")]
    MissingPrivilege {
        user: String,
        missing: String,
        grant: String,
    },

    #[error(
        "wal_level is \"{wal_level}\" but an online backup needs \"replica\" or \"logical\": set wal_level = replica and restart PostgreSQL"
    )]
    WalLevelTooLow { wal_level: String },

    #[error("PostgreSQL {version} is not supported: pgsnap needs PostgreSQL 10 or later")]
    UnsupportedVersion { version: String },

    #[error(
        "the standby was promoted during the backup, so the backup is not usable: {detail}; take a new backup"
    )]
    StandbyPromoted { detail: String },

    #[error(
        "WAL written with full_page_writes = off reached the standby, so a backup taken there would be corrupt: {detail}; set full_page_writes = on and run CHECKPOINT on the primary, then back up again"
    )]
    FullPageWritesOff { detail: String },

    #[error("the backup label is {len} bytes long; PostgreSQL accepts at most {max} bytes")]
    LabelTooLong { len: usize, max: usize },

    #[error(
        "the backup label {label:?} contains a line break or another control character; PostgreSQL would write it into backup_label as extra lines"
    )]
    LabelHasControlCharacters { label: String },

    #[error(
        "the deadline of {deadline:?} in backup mode passed during {step}; the session was closed, so PostgreSQL aborted the backup"
    )]
    DeadlineExceeded { step: Step, deadline: Duration },

    #[error("the database session was lost during {step}: {detail}; PostgreSQL aborted the backup")]
    SessionLost { step: Step, detail: String },

    #[error("{step}: {detail}")]
    InvalidState { step: Step, detail: &'static str },

    #[error("the server returned a backup_label pgsnap cannot read: {0}")]
    LabelInvalid(#[from] LabelError),

    #[error("{what} failed: {detail}{}", sqlstate.as_deref().map(|s| format!(" (SQLSTATE {s})")).unwrap_or_default())]
    Query {
        what: &'static str,
        detail: String,
        sqlstate: Option<String>,
    },
}

impl Error {
    /// A stable CamelCase reason for `status.error.reason`, Events and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "Unreachable",
            Error::AuthenticationFailed { .. } => "AuthenticationFailed",
            Error::Tls { .. } => "TlsFailed",
            Error::MissingPrivilege { .. } => "MissingPrivilege",
            Error::WalLevelTooLow { .. } => "WalLevelTooLow",
            Error::UnsupportedVersion { .. } => "UnsupportedVersion",
            Error::StandbyPromoted { .. } => "StandbyPromoted",
            Error::FullPageWritesOff { .. } => "FullPageWritesOff",
            Error::LabelTooLong { .. } => "LabelTooLong",
            Error::LabelHasControlCharacters { .. } => "LabelHasControlCharacters",
            Error::DeadlineExceeded { .. } => "DeadlineExceeded",
            Error::SessionLost { .. } => "SessionLost",
            Error::InvalidState { .. } => "InvalidState",
            Error::LabelInvalid(_) => "LabelInvalid",
            Error::Query { .. } => "Query",
        }
    }

    /// Whether a new attempt may succeed without anyone changing the database's
    /// configuration, credentials or grants. A failed backup is never resumed: a retry is a
    /// new backup.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. }
            | Error::SessionLost { .. }
            | Error::DeadlineExceeded { .. }
            | Error::StandbyPromoted { .. } => true,
            // Connection problems, shutdowns, resource shortages and serialization
            // conflicts come and go; anything else is a fact about the server.
            Error::Query { sqlstate, .. } => sqlstate
                .as_deref()
                .is_some_and(|s| ["08", "40", "53", "57"].iter().any(|c| s.starts_with(c))),
            Error::AuthenticationFailed { .. }
            | Error::Tls { .. }
            | Error::MissingPrivilege { .. }
            | Error::WalLevelTooLow { .. }
            | Error::UnsupportedVersion { .. }
            | Error::FullPageWritesOff { .. }
            | Error::LabelTooLong { .. }
            | Error::LabelHasControlCharacters { .. }
            | Error::InvalidState { .. }
            | Error::LabelInvalid(_) => false,
        }
    }

    /// Maps an error of a statement run inside an established session.
    pub(crate) fn from_query(
        what: &'static str,
        step: Step,
        user: &str,
        grant: impl FnOnce() -> String,
        e: tokio_postgres::Error,
    ) -> Error {
        let Some(db) = e.as_db_error() else {
            return Error::SessionLost {
                step,
                detail: e.to_string(),
            };
        };
        let code = db.code().code();
        let message = db.message();
        if code == "42501" {
            return Error::MissingPrivilege {
                user: user.to_string(),
                missing: format!("may not run {what} ({message})"),
                grant: grant(),
            };
        }
        if message.contains("promoted during online backup") {
            return Error::StandbyPromoted {
                detail: message.to_string(),
            };
        }
        if message.contains("full_page_writes=off") {
            return Error::FullPageWritesOff {
                detail: message.to_string(),
            };
        }
        if message.contains("WAL level not sufficient") {
            return Error::WalLevelTooLow {
                wal_level: "minimal".to_string(),
            };
        }
        // The server ended this backend (shutdown, pg_terminate_backend): the backup is gone.
        if code.starts_with("57P") || code.starts_with("08") {
            return Error::SessionLost {
                step,
                detail: message.to_string(),
            };
        }
        Error::Query {
            what,
            detail: match db.hint() {
                Some(hint) => format!("{message} (hint: {hint})"),
                None => message.to_string(),
            },
            sqlstate: Some(code.to_string()),
        }
    }

    /// Maps an error of establishing the connection.
    pub(crate) fn from_connect(target: &str, user: &str, e: tokio_postgres::Error) -> Error {
        if let Some(db) = e.as_db_error() {
            let detail = db.message().to_string();
            return match db.code().code() {
                // invalid_password, invalid_authorization_specification (pg_hba reject)
                "28P01" | "28000" => Error::AuthenticationFailed {
                    target: target.to_string(),
                    user: user.to_string(),
                    detail,
                },
                // starting up, shutting down, too many connections
                c if c.starts_with("57P") || c.starts_with("53") => Error::Unreachable {
                    target: target.to_string(),
                    detail,
                },
                c => Error::Query {
                    what: "connect",
                    detail,
                    sqlstate: Some(c.to_string()),
                },
            };
        }
        if is_tls_failure(&e) {
            return Error::Tls {
                target: target.to_string(),
                detail: error_chain(&e),
            };
        }
        Error::Unreachable {
            target: target.to_string(),
            detail: error_chain(&e),
        }
    }
}

crate::controller::failure_from!(Error);

fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        // tokio-postgres reports a server that does not speak TLS this way.
        if err.to_string().contains("server does not support TLS") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The error and its causes on one line: tokio-postgres puts the useful part (the io error,
/// the certificate problem) into the source.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_stable() {
        let cases: Vec<(Error, &str, bool)> = vec![
            (
                Error::Unreachable {
                    target: "db:5432".into(),
                    detail: "refused".into(),
                },
                "Unreachable",
                true,
            ),
            (
                Error::AuthenticationFailed {
                    target: "db:5432".into(),
                    user: "pgsnap".into(),
                    detail: "password authentication failed".into(),
                },
                "AuthenticationFailed",
                false,
            ),
            (
                Error::MissingPrivilege {
                    user: "pgsnap".into(),
                    missing: "may not run pg_backup_start".into(),
                    grant: "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO pgsnap"
                        .into(),
                },
                "MissingPrivilege",
                false,
            ),
            (
                Error::WalLevelTooLow {
                    wal_level: "minimal".into(),
                },
                "WalLevelTooLow",
                false,
            ),
            (
                Error::UnsupportedVersion {
                    version: "9.6.24".into(),
                },
                "UnsupportedVersion",
                false,
            ),
            (
                Error::StandbyPromoted { detail: "x".into() },
                "StandbyPromoted",
                true,
            ),
            (
                Error::FullPageWritesOff { detail: "x".into() },
                "FullPageWritesOff",
                false,
            ),
            (
                Error::LabelTooLong {
                    len: 2000,
                    max: 1024,
                },
                "LabelTooLong",
                false,
            ),
            (
                Error::DeadlineExceeded {
                    step: Step::Stop,
                    deadline: Duration::from_secs(600),
                },
                "DeadlineExceeded",
                true,
            ),
            (
                Error::SessionLost {
                    step: Step::InBackup,
                    detail: "x".into(),
                },
                "SessionLost",
                true,
            ),
            (
                Error::Query {
                    what: "pg_backup_stop",
                    detail: "canceling statement due to user request".into(),
                    sqlstate: Some("57014".into()),
                },
                "Query",
                true,
            ),
            (
                Error::Query {
                    what: "pg_backup_stop",
                    detail: "syntax".into(),
                    sqlstate: Some("42601".into()),
                },
                "Query",
                false,
            ),
        ];
        for (e, reason, retry) in cases {
            assert_eq!(e.reason(), reason, "{e}");
            assert_eq!(e.is_retryable(), retry, "{e}");
        }
    }

    #[test]
    fn messages_name_what_to_do() {
        let e = Error::MissingPrivilege {
            user: "pgsnap".into(),
            missing: "may not run pg_backup_start".into(),
            grant: "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO pgsnap".into(),
        };
        assert!(
            e.to_string()
                .contains("GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO pgsnap")
        );
        let e = Error::DeadlineExceeded {
            step: Step::Stop,
            deadline: Duration::from_secs(5),
        };
        assert!(
            e.to_string().contains("waiting for WAL to be archived"),
            "{e}"
        );
        let e = Error::DeadlineExceeded {
            step: Step::Start,
            deadline: Duration::from_secs(5),
        };
        assert!(e.to_string().contains("checkpoint"), "{e}");
    }
}
