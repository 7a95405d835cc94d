//! The restore proof, one for the PostgreSQL matrix (`pgharness`) and the end-to-end suites
//! (`verify`): numbered rows written one transaction at a time, each with the WAL position
//! its commit reached; a restore of a backup that stopped at some LSN must hold every row
//! whose position is at or before it.

use std::collections::BTreeSet;

use pgsnap::postgres::Lsn;
use tokio_postgres::{Client, Error};

/// Creates the table of numbered rows, `marks`.
pub async fn create_marks(client: &Client) -> Result<(), Error> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS marks (v bigint PRIMARY KEY)")
        .await
}

/// Inserts row `v` in a transaction of its own and returns the server's WAL flush position
/// right after the commit: at or past the commit record, so a backup whose stop LSN is at or
/// past it holds the row.
pub async fn mark(client: &Client, v: i64) -> Result<Lsn, Error> {
    client
        .execute("INSERT INTO marks VALUES ($1)", &[&v])
        .await?;
    let row = client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?;
    Ok(row
        .get::<_, &str>(0)
        .parse()
        .expect("the server's flush LSN"))
}

/// Rows that must be in any correct restore of a backup that stopped at `stop_lsn`.
pub fn committed_before(written: &[(i64, Lsn)], stop_lsn: Lsn) -> BTreeSet<i64> {
    written
        .iter()
        .filter(|(_, lsn)| *lsn <= stop_lsn)
        .map(|(i, _)| *i)
        .collect()
}

/// The rows a restored server holds.
pub async fn restored_marks(client: &Client) -> Result<BTreeSet<i64>, Error> {
    Ok(client
        .query("SELECT v FROM marks", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The check: the rows of `expected` that are not in `restored`.
pub fn missing(expected: &BTreeSet<i64>, restored: &BTreeSet<i64>) -> Vec<i64> {
    expected.difference(restored).copied().collect()
}
