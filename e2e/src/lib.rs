//! The pgsnap test cluster from the Rust side: the node agent (`agent`, run by
//! `e2e/cluster up` as the `node-agent` binary) and the support that end-to-end tests use
//! (`cluster`: client, namespace, waits, logs; `postgres`: PostgreSQL pods).

pub mod agent;
pub mod cluster;
pub mod operator;
pub mod postgres;
pub mod verify;

pub use cluster::Cluster;
pub use postgres::{PostgresPod, postgres_pod};
