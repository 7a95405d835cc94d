//! The pgsnap test cluster from the Rust side, and the one test-support code base: the node
//! agent (`agent`, run by `e2e/cluster up` as the `node-agent` binary) and the support that
//! end-to-end tests use (`cluster`: client, namespace, waits, logs; `postgres`: PostgreSQL
//! pods; `verify`: restores of a Backup's snapshots). Shared with the root package's
//! PostgreSQL matrix tests and benches, which take this crate as a dev-dependency:
//! `pgharness` (local servers of every major, no cluster), `prepare` (the product's
//! restore-prepare on a restored data directory) and `proof` (what every restore must hold).

pub mod agent;
pub mod backups;
pub mod cluster;
pub mod operator;
pub mod pgharness;
pub mod postgres;
pub mod prepare;
pub mod proof;
pub mod tls;
pub mod verify;

pub use cluster::Cluster;
pub use postgres::{PostgresPod, postgres_pod};

/// A free TCP port on the host's loopback, for what tests run on the host itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

/// The `p` quantile (0 to 1) of sorted values, by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One test per PostgreSQL major: `per_major! { matrix; name_pg10: 10, name_pg11: 11, ... }`
/// runs `matrix(major).await` in each, on a runtime with two workers (the server's clients
/// and the test's blocking copies run side by side).
#[macro_export]
macro_rules! per_major {
    ($matrix:path; $($name:ident: $major:expr),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $matrix($major).await;
        }
    )*};
}
