//! Where the PostgreSQL and PgBouncer binaries live.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The binary cache filled by `tools/setup.sh` (`cargo xtask setup`).
///
/// Layout: `<cache>/pg/<major>/bin/{postgres,initdb,pg_ctl,…}`,
/// `<cache>/pgbouncer/current/bin/pgbouncer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    cache: PathBuf,
}

impl Binaries {
    /// Finds the cache: `$PGSHIFT_CACHE`, else `/var/cache/pgshift` as root, else
    /// `${XDG_CACHE_HOME:-$HOME/.cache}/pgshift` — the same rule as `tools/setup.sh`.
    pub fn locate() -> Result<Binaries> {
        let cache = default_cache_dir();
        let pg = cache.join("pg");
        if !pg.is_dir() {
            return Err(Error::CacheNotFound { dir: pg });
        }
        Ok(Binaries { cache })
    }

    /// Uses an explicit cache directory (the one holding `pg/`).
    pub fn at(cache: impl Into<PathBuf>) -> Result<Binaries> {
        let cache = cache.into();
        let pg = cache.join("pg");
        if !pg.is_dir() {
            return Err(Error::CacheNotFound { dir: pg });
        }
        Ok(Binaries { cache })
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// The `bin` directory of one major; errors unless it has `postgres` and `initdb`.
    pub fn bin_dir(&self, major: u32) -> Result<PathBuf> {
        let home = self.cache.join("pg").join(major.to_string());
        let bin = home.join("bin");
        if ["postgres", "initdb"]
            .iter()
            .all(|tool| bin.join(tool).is_file())
        {
            Ok(bin)
        } else {
            Err(Error::MajorNotFound { major, dir: home })
        }
    }

    /// pg_dump and psql of one major: the server's own `bin` where it has them (15, 18), else
    /// the client tools setup installs apart (`<cache>/tools/<major>/bin`: 16).
    pub fn client_tools(&self, major: u32) -> Result<PathBuf> {
        let has_tools = |bin: &Path| ["pg_dump", "psql"].iter().all(|t| bin.join(t).is_file());
        let server = self.cache.join("pg").join(major.to_string()).join("bin");
        if has_tools(&server) {
            return Ok(server);
        }
        let apart = self.cache.join("tools").join(major.to_string());
        match has_tools(&apart.join("bin")) {
            true => Ok(apart.join("bin")),
            false => Err(Error::ClientToolsNotFound { major, dir: apart }),
        }
    }

    /// The majors whose server binaries are present, ascending.
    pub fn available_majors(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.cache.join("pg")) else {
            return Vec::new();
        };
        let mut majors: Vec<u32> = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|major| self.bin_dir(*major).is_ok())
            .collect();
        majors.sort_unstable();
        majors
    }

    /// The PgBouncer executable the setup built (1.24: prepared statements in transaction
    /// mode, which Debian bookworm's 1.18 lacks — tests of the drivers' defaults need them).
    pub fn pgbouncer(&self) -> Result<PathBuf> {
        let built = self.cache.join("pgbouncer/current/bin/pgbouncer");
        if built.is_file() {
            Ok(built)
        } else {
            Err(Error::PgBouncerNotFound { path: built })
        }
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGSHIFT_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/pgshift");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("pgshift")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cache_says_what_to_do() {
        let err = Binaries::at("/nonexistent/pgshift-cache").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/pgshift-cache/pg"), "{msg}");
        assert!(msg.contains("cargo xtask setup"), "{msg}");
    }

    #[test]
    fn missing_major_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pg")).unwrap();
        let binaries = Binaries::at(dir.path()).unwrap();
        let msg = binaries.bin_dir(16).unwrap_err().to_string();
        assert!(
            msg.starts_with("PostgreSQL 16 binaries not found in"),
            "{msg}"
        );
        assert!(msg.ends_with("pg/16: run `cargo xtask setup`"), "{msg}");
        assert!(binaries.available_majors().is_empty());
    }

    #[test]
    fn client_tools_come_with_the_server_or_apart_or_the_error_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pg")).unwrap();
        let binaries = Binaries::at(dir.path()).unwrap();
        let msg = binaries.client_tools(16).unwrap_err().to_string();
        assert!(msg.contains("tools/16: run `cargo xtask setup`"), "{msg}");
        let tools = |at: &Path| {
            std::fs::create_dir_all(at).unwrap();
            for tool in ["pg_dump", "psql"] {
                std::fs::write(at.join(tool), "").unwrap();
            }
        };
        tools(&dir.path().join("tools/16/bin"));
        assert_eq!(
            binaries.client_tools(16).unwrap(),
            dir.path().join("tools/16/bin")
        );
        tools(&dir.path().join("pg/16/bin"));
        assert_eq!(
            binaries.client_tools(16).unwrap(),
            dir.path().join("pg/16/bin")
        );
    }
}
