//! How the session reaches the server: host, credentials and TLS, with the sslmode names
//! of libpq.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::Error;

/// libpq's sslmode, minus the modes nobody should use for backups (`allow`, `verify-ca`).
// The Backup resource's `connection.sslMode` is this type too, hence the serde and schema.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without checking its certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked (encryption against passive
    /// eavesdroppers only, as in libpq without a root certificate).
    Require,
    /// TLS, the certificate chains to `ca_cert_pem` and names `host`.
    VerifyFull,
}

#[derive(Clone)]
pub struct ConnectOptions {
    /// A DNS name, an IP address, or an absolute path of a Unix socket directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub ssl_mode: SslMode,
    /// PEM, one or more certificates; required for `VerifyFull`.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// The name the certificate must carry under `VerifyFull`, when not `host`: the
    /// connection goes to `host` (an IP address), the check to this name.
    pub server_name: Option<String>,
    /// Shown in `pg_stat_activity`, so a DBA can see who holds the backup open.
    pub application_name: String,
    pub connect_timeout: Duration,
}

// Hand-written so the password can never reach a log line through `{:?}`.
impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|c| c.len()))
            .field("server_name", &self.server_name)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ConnectOptions {
    /// `host:port`, for messages.
    pub fn target(&self) -> String {
        if self.host.starts_with('/') {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub(crate) fn config(&self) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        match (&self.server_name, self.host.parse::<std::net::IpAddr>()) {
            // TLS verifies (and SNI names) `host`; `hostaddr` is where the socket goes.
            (Some(name), Ok(ip)) => cfg.host(name).hostaddr(ip),
            _ => cfg.host(&self.host),
        };
        cfg.port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            // A backup may sit idle for the whole snapshot; keepalives find a dead peer
            // (node gone, network partition) instead of waiting forever.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
            });
        if let Some(password) = &self.password {
            cfg.password(password.as_bytes());
        }
        cfg
    }

    pub(crate) fn tls(&self) -> Result<MakeRustlsConnect, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_err = |detail: String| Error::Tls {
            target: self.target(),
            detail,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(e.to_string()))?;
        let config = match self.ssl_mode {
            SslMode::VerifyFull => {
                let pem = self.ca_cert_pem.as_deref().ok_or_else(|| {
                    tls_err(
                        "sslmode verify-full needs a CA certificate to verify the server against"
                            .into(),
                    )
                })?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| {
                        tls_err(format!("the CA certificate is not valid PEM: {e}"))
                    })?;
                    roots
                        .add(cert)
                        .map_err(|e| tls_err(format!("the CA certificate is not usable: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(tls_err("the CA PEM holds no certificate".into()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

/// libpq's `require`/`prefer`: the certificate is not checked, but the handshake
/// signatures still are, so the channel is really keyed to the presented certificate.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
