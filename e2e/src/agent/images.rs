//! The node's "image store": a fixed table of image names and what running them means here.
//! Nothing is pulled; each image maps to programs on this machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

/// What the table knows, for the error message of an unknown image.
pub const KNOWN: &str = "postgres:10 .. postgres:18 (any tag starting with the major, e.g. 16-alpine; \
                         latest = 18), pgsnap:dev, busybox, alpine, debian, ubuntu, bash (host shell tools)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// The official PostgreSQL image of one major version.
    Postgres { major: u32 },
    /// The project's own binary.
    Pgsnap,
    /// A general-purpose image: the command runs with the host's /bin/sh and tools.
    Shell,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} is not in the node agent's image table (known: {KNOWN})")]
    Unknown(String),
    #[error("installing the PostgreSQL {major} server binaries with {script}: {message}")]
    PostgresBin {
        major: u32,
        script: PathBuf,
        message: String,
    },
}

impl Image {
    pub fn parse(image: &str) -> Result<Image, ImageError> {
        let unknown = || ImageError::Unknown(image.to_owned());
        let without_digest = image.split('@').next().unwrap_or(image);
        let name = ["docker.io/library/", "docker.io/", "library/"]
            .iter()
            .find_map(|p| without_digest.strip_prefix(p))
            .unwrap_or(without_digest);
        let (repo, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
        match repo {
            "postgres" => {
                let major = if tag == "latest" {
                    18
                } else {
                    let digits: String = tag.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().map_err(|_| unknown())?
                };
                if (10..=18).contains(&major) {
                    Ok(Image::Postgres { major })
                } else {
                    Err(unknown())
                }
            }
            "pgsnap" | "ghcr.io/pgsnap/pgsnap" => Ok(Image::Pgsnap),
            "busybox" | "alpine" | "debian" | "ubuntu" | "bash" => Ok(Image::Shell),
            _ => Err(unknown()),
        }
    }

    /// The signal that stops the image's main process (the image's STOPSIGNAL): PostgreSQL's
    /// image uses SIGINT, a fast shutdown, rather than SIGTERM's wait-for-clients.
    pub fn stop_signal(self) -> libc::c_int {
        match self {
            Image::Postgres { .. } => libc::SIGINT,
            _ => libc::SIGTERM,
        }
    }
}

/// Where the PostgreSQL binaries of a major appear inside a container (bind-mounted there,
/// since the cache under /root is not readable by the postgres user).
pub fn postgres_mount_point(major: u32) -> PathBuf {
    PathBuf::from(format!("/opt/pgsnap/postgres/{major}"))
}

/// Installs (once) and remembers the server binaries per major via `hack/postgres-bin`.
pub struct PostgresBinaries {
    script: PathBuf,
    cache: Mutex<HashMap<u32, PathBuf>>,
}

impl PostgresBinaries {
    pub fn new(repo: &Path) -> Self {
        Self {
            script: repo.join("hack/postgres-bin"),
            cache: Mutex::default(),
        }
    }

    /// The installation directory (holding bin/, lib/, share/) of one major.
    pub async fn install_dir(&self, major: u32) -> Result<PathBuf, ImageError> {
        // Held across the install so two pods of one major do not both download it.
        let mut cache = self.cache.lock().await;
        if let Some(dir) = cache.get(&major) {
            return Ok(dir.clone());
        }
        let err = |message: String| ImageError::PostgresBin {
            major,
            script: self.script.clone(),
            message,
        };
        let out = tokio::process::Command::new(&self.script)
            .arg(major.to_string())
            .output()
            .await
            .map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let dir = bin
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| err(format!("odd output {bin:?}")))?;
        cache.insert(major, dir.clone());
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(
            Image::parse("postgres:16").unwrap(),
            Image::Postgres { major: 16 }
        );
        assert_eq!(
            Image::parse("docker.io/library/postgres:10.23-alpine").unwrap(),
            Image::Postgres { major: 10 }
        );
        assert_eq!(
            Image::parse("postgres").unwrap(),
            Image::Postgres { major: 18 }
        );
        assert_eq!(Image::parse("pgsnap:dev").unwrap(), Image::Pgsnap);
        assert_eq!(Image::parse("busybox:1.36").unwrap(), Image::Shell);
        let err = Image::parse("postgres:9.6").unwrap_err().to_string();
        assert!(err.contains("not in the node agent's image table"), "{err}");
        assert!(Image::parse("nginx:latest").is_err());
    }
}
