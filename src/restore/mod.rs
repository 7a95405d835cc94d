//! Restores: a Backup's snapshots back into PVCs that PostgreSQL recovers from.

pub mod prepare;
