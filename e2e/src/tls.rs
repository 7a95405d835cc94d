//! A throwaway certificate authority for TLS tests, made with the `openssl` command the test
//! cluster already needs.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

/// A server certificate and its key, readable only by `owner` as PostgreSQL demands.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A self-signed CA named `name` in `dir` (created).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path(&key),
            "-out",
            path(&cert),
        ]);
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        std::fs::read_to_string(&self.cert).expect("the CA certificate")
    }

    /// A server certificate for the DNS name `dns` only (no IP address), owned by `owner`.
    pub fn issue(&self, dns: &str, owner: u32) -> ServerCert {
        let cert = self.dir.join(format!("{dns}.crt"));
        let key = self.dir.join(format!("{dns}.key"));
        let csr = self.dir.join(format!("{dns}.csr"));
        let ext = self.dir.join(format!("{dns}.ext"));
        std::fs::write(
            &ext,
            format!("subjectAltName=DNS:{dns}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("extension file");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={dns}"),
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            path(&self.cert),
            "-CAkey",
            path(&self.key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path(&ext),
            "-out",
            path(&cert),
        ]);
        for file in [&cert, &key] {
            std::os::unix::fs::chown(file, Some(owner), Some(owner))
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("key mode");
        ServerCert { cert, key }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
