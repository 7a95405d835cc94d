//! The PostgreSQL backup session: one connection that starts a non-exclusive backup,
//! stays open while volumes are snapshotted, and stops the backup.
