//! The PostgreSQL backup session: one connection that starts a non-exclusive backup,
//! stays open while volumes are snapshotted, and stops the backup. No Kubernetes here.

mod catalog;
mod connect;
mod error;
mod label;
mod session;

pub use catalog::{MIN_MAJOR, RoleInfo, ServerInfo, Tablespace, quote_ident};
pub use connect::{ConnectOptions, SslMode};
pub use error::{Error, Step};
pub use label::{BackupFrom, BackupLabel, LabelError, Lsn, wal_segments};
pub use session::{
    MAX_LABEL_BYTES, SERVER_GRACE, Session, Started, Stopped, WalReceiver, backup_functions, grants,
};
