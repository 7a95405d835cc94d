//! Connection failures that need no PostgreSQL: nothing listening, and a peer that accepts
//! TCP but never answers (a hung pod, a wrong port on a proxy) must both end as
//! Unreachable within the connect timeout, never hang.

use std::time::{Duration, Instant};

use pgsnap::postgres::{ConnectOptions, Session, SslMode};

fn opts(port: u16) -> ConnectOptions {
    ConnectOptions {
        host: "127.0.0.1".into(),
        port,
        user: "pgsnap".into(),
        password: Some("never-printed-Pw".into()),
        database: "postgres".into(),
        ssl_mode: SslMode::Prefer,
        ca_cert_pem: None,
        server_name: None,
        application_name: "pgsnap-test".into(),
        connect_timeout: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Session::connect(&opts(port)).await.err().unwrap();
    assert_eq!(err.reason(), "Unreachable", "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.to_string().contains("never-printed-Pw"));
}

#[tokio::test]
async fn silent_peer_times_out_as_unreachable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold the connection without ever answering.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let t = Instant::now();
    let err = Session::connect(&opts(port)).await.err().unwrap();
    assert_eq!(err.reason(), "Unreachable", "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(format!("{err:?}").find("never-printed-Pw").is_none());
    holder.abort();
}

#[test]
fn debug_output_redacts_the_password() {
    let printed = format!("{:?}", opts(5432));
    assert!(!printed.contains("never-printed-Pw"), "{printed}");
    assert!(printed.contains("<redacted>"));
}
