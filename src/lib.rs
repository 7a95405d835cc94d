//! pgsnap: a Kubernetes operator that takes online, restorable CSI snapshot backups of
//! PostgreSQL. See DESIGN in the README for the resources and the backup's steps.

pub mod api;
pub mod postgres;
