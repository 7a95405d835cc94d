//! pgsnap: a Kubernetes operator that takes online, restorable CSI snapshot backups of
//! PostgreSQL. One database session holds a non-exclusive backup open while the volumes are
//! snapshotted; `backup_label` and `tablespace_map` are kept beside the snapshots.

pub mod api;
pub mod backup;
pub mod cli;
pub mod controller;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod label_store;
pub mod leader;
pub mod plugin;
pub mod postgres;
pub mod restore;
pub mod schedule;
pub mod snapshots;
pub mod telemetry;
pub mod verify;
