//! Test support for pgsnap's end-to-end tests: the local cluster and its node agent.

pub mod agent;
