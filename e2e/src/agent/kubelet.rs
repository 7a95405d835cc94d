//! The kubelet's HTTPS API, the part the API server calls for `kubectl logs` and
//! `kubectl exec`: `GET /containerLogs/{ns}/{pod}/{container}` and
//! `GET /exec/{ns}/{pod}/{container}` (WebSocket, see `exec`).
//!
//! TLS with a serving certificate of the cluster CA; every client must present a certificate
//! signed by that CA (the API server's `--kubelet-client-certificate`). Any such client may
//! read logs and exec: there is no authorization beyond the certificate.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path as UrlPath, RawQuery, State, WebSocketUpgrade};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::AsyncReadExt;
use tokio_rustls::TlsAcceptor;

use super::exec;
use super::pod::{LogSource, Lookup};
use super::{AgentError, Shared};

/// The TLS side: our serving certificate, and client certificates required, signed by
/// `client_ca`.
pub fn tls_acceptor(cert: &Path, key: &Path, client_ca: &Path) -> Result<TlsAcceptor, AgentError> {
    let tls = |what: &Path, e: &dyn std::fmt::Display| {
        AgentError::Tls(format!("{}: {e}", what.display()))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls(cert, &e))?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls(key, &e))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca).map_err(|e| tls(client_ca, &e))? {
        roots
            .add(ca.map_err(|e| tls(client_ca, &e))?)
            .map_err(|e| tls(client_ca, &e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls(client_ca, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(certs, private_key)
        })
        .map_err(|e| tls(cert, &e))?;
    // HTTP/1.1 only: exec is an HTTP/1.1 upgrade.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves the kubelet API on `listener` until the agent exits.
pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, tls: TlsAcceptor) {
    let app = Router::new()
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec).post(exec))
        .with_state(shared);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "kubelet API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, app) = (tls.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "kubelet API: TLS handshake refused");
                    return;
                }
            };
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "kubelet API connection");
            }
        });
    }
}

fn lookup_error(e: Lookup) -> Response {
    let status = match e {
        Lookup::NoPod(_) | Lookup::NoContainer(..) => StatusCode::NOT_FOUND,
        Lookup::Unavailable(_) => StatusCode::BAD_REQUEST,
    };
    (status, e.to_string()).into_response()
}

/// The query as (name, value) pairs, repeated names kept (exec's `command`).
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// A boolean query value as Go's `strconv.ParseBool` reads it (the API server sends `true`
/// for logs and `1` for exec).
pub fn flag(name: &str, value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{name}: {value:?} is not a boolean")),
    }
}

/// `PodLogOptions` as the API server passes them on.
#[derive(Debug, Default, PartialEq)]
struct LogOptions {
    follow: bool,
    previous: bool,
    tail_lines: Option<u64>,
    limit_bytes: Option<u64>,
}

impl LogOptions {
    fn parse(query: Option<&str>) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let number = |name: &str, value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name}: {value:?} is not a number of at least 0"))
        };
        for (name, value) in query_pairs(query) {
            match name.as_str() {
                "follow" => o.follow = flag(&name, &value)?,
                "previous" => o.previous = flag(&name, &value)?,
                // `tail` is the kubelet's older spelling; "all" is no limit.
                "tail" if value == "all" => o.tail_lines = None,
                "tailLines" | "tail" => o.tail_lines = Some(number(&name, &value)?),
                "limitBytes" => o.limit_bytes = Some(number(&name, &value)?),
                "timestamps" if !flag(&name, &value)? => {}
                "timestamps" | "sinceSeconds" | "sinceTime" => {
                    return Err(format!(
                        "{name} is not supported: the pgsnap node agent keeps no time per log line"
                    ));
                }
                "stream" if value != "All" => {
                    return Err(format!("unable to return the given log stream: {value:?}"));
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

async fn container_logs(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let opts = match LogOptions::parse(query.as_deref()) {
        Ok(o) => o,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let source = match shared.pods.logs(&ns, &pod, &container, opts.previous) {
        Ok(s) => s,
        Err(e) => return lookup_error(e),
    };
    match log_body(source, opts).await {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// How often a followed log is checked for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
const CHUNK: usize = 32 * 1024;

/// The log from its start, or its last `tail_lines` lines; with `follow`, then what the
/// instance writes until it ends; at most `limit_bytes`.
async fn log_body(source: LogSource, opts: LogOptions) -> Result<Body, String> {
    let path = source.path.clone();
    let tail = opts.tail_lines;
    let file = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        if let Some(n) = tail {
            let start = tail_offset(&mut file, n)?;
            file.seek(SeekFrom::Start(start))?;
        }
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{}: {e}", source.path.display()))?;
    let reader = LogReader {
        file: tokio::fs::File::from_std(file),
        source,
        follow: opts.follow,
        remaining: opts.limit_bytes.unwrap_or(u64::MAX),
        last_pass: false,
    };
    let chunks = futures::stream::unfold(reader, |mut r| async move {
        let chunk = r.next().await?;
        Some((chunk, r))
    });
    Ok(Body::from_stream(chunks))
}

struct LogReader {
    file: tokio::fs::File,
    source: LogSource,
    follow: bool,
    remaining: u64,
    /// The instance has ended: read to the end once more, then stop.
    last_pass: bool,
}

impl LogReader {
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let want = CHUNK.min(usize::try_from(self.remaining).unwrap_or(CHUNK));
            if want == 0 {
                return None;
            }
            match self.file.read(&mut buf[..want]).await {
                Err(e) => {
                    self.remaining = 0;
                    return Some(Err(e));
                }
                Ok(0) if !self.follow || self.last_pass => return None,
                // Output written before the process ended is in the file by the time it
                // counts as ended: one more pass reads all of it.
                Ok(0) if !self.source.running() => self.last_pass = true,
                Ok(0) => tokio::time::sleep(FOLLOW_POLL).await,
                Ok(n) => {
                    self.remaining -= n as u64;
                    buf.truncate(n);
                    return Some(Ok(Bytes::from(buf)));
                }
            }
        }
    }
}

/// Where the last `n` lines of `file` start. A last line without a newline counts as one.
fn tail_offset(file: &mut std::fs::File, n: u64) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if n == 0 {
        return Ok(len);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let (mut end, mut newlines) = (len, 0);
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            let at = start + i as u64;
            // The file's final newline ends the last line rather than starting one.
            if *b == b'\n' && at + 1 != len {
                newlines += 1;
                if newlines == n {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

/// Why an exec request cannot be a WebSocket session.
const WEBSOCKET_ONLY: &str = "the pgsnap node agent speaks only the WebSocket streaming \
    protocols (v5.channel.k8s.io, v4.channel.k8s.io), not SPDY: kube-apiserver must pass \
    WebSockets through (--feature-gates TranslateStreamCloseWebsocketRequests=false)";

async fn exec(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let opts = match exec::Options::parse(query.as_deref()) {
        Ok(o) => o,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let target = match shared.pods.exec_target(&ns, &pod, &container) {
        Ok(t) => t,
        Err(e) => return lookup_error(e),
    };
    let Ok(upgrade) = upgrade else {
        return (StatusCode::BAD_REQUEST, WEBSOCKET_ONLY).into_response();
    };
    let upgrade = upgrade.protocols(exec::PROTOCOLS);
    let Some(protocol) = upgrade.selected_protocol() else {
        return (StatusCode::BAD_REQUEST, WEBSOCKET_ONLY).into_response();
    };
    let v5 = protocol == exec::PROTOCOLS[0];
    // Not the command line: it may carry a password.
    tracing::info!(pod = %format!("{ns}/{pod}"), %container, "exec");
    upgrade.on_upgrade(move |socket| exec::session(shared, target, container, opts, v5, socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_offsets() {
        let dir = std::env::temp_dir().join(format!("node-agent-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let tail = |text: &str, n: u64| {
            std::fs::write(&path, text).unwrap();
            let mut f = std::fs::File::open(&path).unwrap();
            let at = tail_offset(&mut f, n).unwrap() as usize;
            text[at..].to_owned()
        };
        assert_eq!(tail("a\nb\nc\n", 1), "c\n");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc\n", 5), "a\nb\nc\n");
        assert_eq!(tail("a\nb\nc", 1), "c", "a last line without newline");
        assert_eq!(tail("a\nb\n", 0), "");
        assert_eq!(tail("", 3), "");
        let long: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&long, 2), "line 19998\nline 19999\n", "across blocks");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_options_as_the_api_server_sends_them() {
        assert_eq!(
            LogOptions::parse(Some("follow=true&tailLines=1&limitBytes=10&stream=All")),
            Ok(LogOptions {
                follow: true,
                previous: false,
                tail_lines: Some(1),
                limit_bytes: Some(10)
            })
        );
        assert_eq!(
            LogOptions::parse(Some("previous=true&tail=all")),
            Ok(LogOptions {
                previous: true,
                ..LogOptions::default()
            })
        );
        assert!(LogOptions::parse(Some("timestamps=true")).is_err());
        assert!(LogOptions::parse(Some("sinceSeconds=10")).is_err());
        assert!(LogOptions::parse(Some("stream=Stderr")).is_err());
        assert!(LogOptions::parse(Some("tailLines=-1")).is_err());
        assert_eq!(LogOptions::parse(None), Ok(LogOptions::default()));
    }
}
