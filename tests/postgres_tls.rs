//! TLS: sslmode disable / prefer / require / verify-full against a server that only lets
//! the backup role in over TLS, with a throwaway CA made by openssl.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pgsnap::postgres::{Session, SslMode};
use pgsnap_e2e::pgharness::{Pg, TestDir, chown};

const PASSWORD: &str = "tls-Pw-for-tests";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN=pgsnap test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

async fn tls_matrix(major: u32) {
    let dir = TestDir::new(&format!("tls{major}"));
    let certs = dir.0.join("certs");
    fs::create_dir_all(&certs).unwrap();
    make_ca(&certs, "ca");
    make_ca(&certs, "other-ca");
    fs::write(
        certs.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &certs,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        &certs,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );

    let mut pg = Pg::init(
        major,
        &dir,
        "primary",
        &[
            ("ssl", "on"),
            ("ssl_cert_file", "'server.crt'"),
            ("ssl_key_file", "'server.key'"),
        ],
    );
    for f in ["server.crt", "server.key"] {
        fs::copy(certs.join(f), pg.data.join(f)).unwrap();
    }
    fs::write(
        pg.data.join("pg_hba.conf"),
        "host all postgres 127.0.0.1/32 trust\n\
         hostssl all pgsnap 127.0.0.1/32 md5\n\
         hostnossl all pgsnap 127.0.0.1/32 reject\n",
    )
    .unwrap();
    chown(&pg.data);
    Command::new("chmod")
        .arg("600")
        .arg(pg.data.join("server.key"))
        .status()
        .unwrap();
    pg.start(Duration::from_secs(60)).await.unwrap();
    pg.exec(&format!(
        "create role pgsnap superuser login password '{PASSWORD}'"
    ))
    .await;

    let ca = fs::read(certs.join("ca.crt")).unwrap();
    let other_ca = fs::read(certs.join("other-ca.crt")).unwrap();
    let opts = |mode: SslMode, host: &str, ca: Option<&[u8]>| {
        let mut o = pg.opts("pgsnap", Some(PASSWORD));
        o.ssl_mode = mode;
        o.host = host.into();
        o.ca_cert_pem = ca.map(<[u8]>::to_vec);
        o
    };
    let uses_tls = |pid: i32| {
        let pg = &pg;
        async move {
            pg.client()
                .await
                .query_one("select ssl from pg_stat_ssl where pid = $1", &[&pid])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };

    // Plain TCP is refused by pg_hba for this role.
    let err = Session::connect(&opts(SslMode::Disable, "127.0.0.1", None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "AuthenticationFailed", "{err}");

    for (mode, host, ca) in [
        (SslMode::Prefer, "127.0.0.1", None),
        (SslMode::Require, "127.0.0.1", None),
        (SslMode::VerifyFull, "localhost", Some(ca.as_slice())),
        (SslMode::VerifyFull, "127.0.0.1", Some(ca.as_slice())),
    ] {
        let mut s = Session::connect(&opts(mode, host, ca))
            .await
            .unwrap_or_else(|e| panic!("{mode:?} to {host}: {e}"));
        assert!(uses_tls(s.backend_pid()).await, "{mode:?} uses TLS");
        s.start("over tls", true, Duration::from_secs(60))
            .await
            .unwrap();
        s.stop(false).await.unwrap();
    }

    // verify-full: a certificate from another CA, and no CA at all, are refused.
    let err = Session::connect(&opts(SslMode::VerifyFull, "localhost", Some(&other_ca)))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "TlsFailed", "{err}");
    assert!(!err.is_retryable());
    let err = Session::connect(&opts(SslMode::VerifyFull, "localhost", None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "TlsFailed", "{err}");
    assert!(err.to_string().contains("CA certificate"), "{err}");
    let err = Session::connect(&opts(SslMode::VerifyFull, "localhost", Some(b"not a pem")))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "TlsFailed", "{err}");

    // A server without TLS: require refuses, prefer falls back (and pg_hba rejects).
    pg.exec("alter system set ssl = off").await;
    pg.exec("select pg_reload_conf()").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = Session::connect(&opts(SslMode::Require, "127.0.0.1", None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "TlsFailed", "{err}");
    let err = Session::connect(&opts(SslMode::Prefer, "127.0.0.1", None))
        .await
        .err()
        .unwrap();
    assert_eq!(err.reason(), "AuthenticationFailed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pg10() {
    tls_matrix(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pg18() {
    tls_matrix(18).await;
}
