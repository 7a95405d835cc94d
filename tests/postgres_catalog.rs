//! Where the server's files really are: `pg_wal` as a link to another directory (another
//! volume, `initdb --waldir`) is recognised among candidate directories, tablespaces are
//! listed with their locations. A role without the file privileges is told the grants. And
//! a server with wal_level = minimal is refused before a backup starts.

use std::time::Duration;

use pgsnap::postgres::{Session, grants};
use pgsnap_e2e::pgharness::{Pg, TestDir};

async fn wal_link(major: u32) {
    let dir = TestDir::new(&format!("catalog{major}"));
    let wal = dir.owned("volumes/wal/pg_wal");
    let other = dir.owned("volumes/wal/other");
    let ts = dir.owned("volumes/ts");
    let wal_arg = wal.display().to_string();
    let mut pg = Pg::init_with(major, &dir, "primary", &[], &["--waldir", &wal_arg]);
    pg.start(Duration::from_secs(60)).await.unwrap();
    pg.exec(&format!("create tablespace ts location '{}'", ts.display()))
        .await;

    let s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    let info = s.server();
    assert_eq!(info.wal_directory, format!("{}/pg_wal", pg.data.display()));
    let vol = dir.0.join("volumes/wal").display().to_string();
    let other = other.display().to_string();
    let data = pg.data.display().to_string();
    let candidates = [
        vol.as_str(),
        other.as_str(),
        data.as_str(),
        "/nonexistent",
        "/root",
        wal_arg.as_str(),
    ];
    if major < 11 {
        let err = s.locate_wal(&candidates).await.unwrap_err();
        assert!(err.to_string().contains("PostgreSQL 10"), "{err}");
        return;
    }
    assert_eq!(
        s.locate_wal(&candidates).await.unwrap(),
        Some(wal_arg.clone())
    );
    assert_eq!(s.locate_wal(&candidates[..5]).await.unwrap(), None);
    assert_eq!(info.tablespaces.len(), 1);
    assert_eq!(info.tablespaces[0].name, "ts");
    assert_eq!(info.tablespaces[0].location, ts.display().to_string());

    let mut setup = "create role pgsnap login password 'pw-Catalog-1';".to_string();
    for g in grants(major, "pgsnap") {
        setup.push_str(&g);
        setup.push(';');
    }
    pg.exec(&setup).await;
    let s = Session::connect(&pg.opts("pgsnap", Some("pw-Catalog-1")))
        .await
        .unwrap();
    assert_eq!(s.server().tablespaces[0].location, ts.display().to_string());
    let err = s.locate_wal(&candidates).await.unwrap_err();
    assert_eq!(err.reason(), "MissingPrivilege", "{err}");
    assert!(
        err.to_string()
            .contains("GRANT EXECUTE ON FUNCTION pg_ls_dir(text, boolean, boolean) TO pgsnap"),
        "{err}"
    );
    if major >= 11 {
        pg.exec("grant pg_read_server_files to pgsnap").await;
        pg.exec("grant execute on function pg_ls_dir(text, boolean, boolean) to pgsnap")
            .await;
        pg.exec("grant execute on function pg_stat_file(text, boolean) to pgsnap")
            .await;
        let s = Session::connect(&pg.opts("pgsnap", Some("pw-Catalog-1")))
            .await
            .unwrap();
        assert_eq!(
            s.locate_wal(&candidates).await.unwrap(),
            Some(wal_arg.clone())
        );
    }
}

/// A server that cannot be backed up online: told before anything starts.
async fn wal_level_minimal(major: u32) {
    let dir = TestDir::new(&format!("minimal{major}"));
    let mut pg = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("wal_level", "minimal"),
            ("max_wal_senders", "0"),
            ("archive_mode", "off"),
        ],
    );
    pg.start(Duration::from_secs(60)).await.unwrap();
    let mut s = Session::connect(&pg.opts("postgres", None)).await.unwrap();
    assert_eq!(s.server().wal_level, "minimal");
    let err = s
        .start("x", true, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "WalLevelTooLow", "{err}");
    assert!(err.to_string().contains("wal_level = replica"), "{err}");
    assert!(!err.is_retryable());
}

/// What the catalog tells of a server of `major`.
async fn catalog_matrix(major: u32) {
    wal_link(major).await;
    wal_level_minimal(major).await;
}

pgsnap_e2e::per_major! {
    catalog_matrix;
    wal_link_pg10: 10, wal_link_pg11: 11, wal_link_pg12: 12, wal_link_pg13: 13, wal_link_pg14: 14,
    wal_link_pg15: 15, wal_link_pg16: 16, wal_link_pg17: 17, wal_link_pg18: 18,
}
