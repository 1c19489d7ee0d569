//! Password files in libpq's pgpass format: pgshift's CLI reads passwords from `PGPASSFILE`,
//! never from a URL.

use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::process::write_0600;
use crate::server::PgServer;

/// One `host:port:database:user:password` line (`Debug` and JSON leave the password out).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct PgpassEntry {
    /// Host name or address (`*` matches any).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database name (`*` matches any).
    pub database: String,
    /// User name.
    pub user: String,
    /// The password.
    #[serde(skip)]
    pub password: String,
}

impl std::fmt::Debug for PgpassEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgpassEntry")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl PgpassEntry {
    /// The line, with `:` and `\` escaped as libpq expects (`*` is kept as the wildcard).
    pub fn line(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            escape(&self.host),
            self.port,
            escape(&self.database),
            escape(&self.user),
            escape(&self.password)
        )
    }
}

/// Writes a pgpass file (mode 0600) with the superuser password of each server.
pub fn write_pgpass(path: &Path, servers: &[&PgServer]) -> Result<()> {
    let entries: Vec<PgpassEntry> = servers.iter().map(|s| s.pgpass_entry()).collect();
    write_pgpass_entries(path, &entries)
}

/// Writes `entries` to `path` as a pgpass file with mode 0600 (libpq ignores looser files);
/// for mixes such as servers plus PgBouncer's admin console.
pub fn write_pgpass_entries(path: &Path, entries: &[PgpassEntry]) -> Result<()> {
    let mut text = String::new();
    for entry in entries {
        text.push_str(&entry.line());
        text.push('\n');
    }
    write_0600(path, &text)
}

fn escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry(password: &str) -> PgpassEntry {
        PgpassEntry {
            host: "127.0.0.1".into(),
            port: 5433,
            database: "*".into(),
            user: "postgres".into(),
            password: password.into(),
        }
    }

    #[test]
    fn escapes_colons_and_backslashes() {
        assert_eq!(entry(r"a:b\c").line(), r"127.0.0.1:5433:*:postgres:a\:b\\c");
    }

    #[test]
    fn debug_hides_the_password() {
        let text = format!("{:?}", entry("hunter2"));
        assert!(
            !text.contains("hunter2") && text.contains("<redacted>"),
            "{text}"
        );
    }

    #[test]
    fn file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        write_pgpass_entries(&path, &[entry("x"), entry("y")]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "127.0.0.1:5433:*:postgres:x\n127.0.0.1:5433:*:postgres:y\n"
        );
    }
}
