//! What each PgBouncer in front of the source is (read on its admin console with `SHOW VERSION`
//! and `SHOW CONFIG`), for preflight: whether it carries prepared statements across server
//! connections, its pooling mode, and how it authenticates clients.

use serde::Serialize;

use crate::endpoint::Endpoint;
use crate::error::Result;
use crate::pgbouncer::Admin;

/// One PgBouncer, as its console reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolerFacts {
    /// The console's address, `host:port`.
    pub console: String,
    /// `1.24.1`; empty when the console does not say.
    pub version: String,
    /// `None` when PgBouncer has no such setting (before 1.21).
    pub max_prepared_statements: Option<i64>,
    pub pool_mode: String,
    pub auth_type: String,
}

impl PoolerFacts {
    /// `(major, minor)` of the version, when it can be read.
    pub fn release(&self) -> Option<(u32, u32)> {
        let mut parts = self.version.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    }
}

/// Reads the facts of every console, in order.
pub async fn read_all(consoles: &[&Endpoint]) -> Result<Vec<PoolerFacts>> {
    let mut facts = Vec::with_capacity(consoles.len());
    for console in consoles {
        facts.push(read(console).await?);
    }
    Ok(facts)
}

/// Reads one console's facts. The console speaks only the simple query protocol.
pub async fn read(console: &Endpoint) -> Result<PoolerFacts> {
    let admin = Admin::connect(console).await?;
    let version = admin
        .rows("SHOW VERSION")
        .await?
        .first()
        .and_then(|row| row.get(0))
        .map(version_number)
        .unwrap_or_default();
    let config = admin.rows("SHOW CONFIG").await?;
    let setting = |key: &str| {
        config
            .iter()
            .find(|row| row.get(0) == Some(key))
            .and_then(|row| row.get(1).map(str::to_string))
    };
    Ok(PoolerFacts {
        console: format!("{}:{}", console.host, console.port),
        version,
        max_prepared_statements: setting("max_prepared_statements").and_then(|v| v.parse().ok()),
        pool_mode: setting("pool_mode").unwrap_or_default(),
        auth_type: setting("auth_type").unwrap_or_default(),
    })
}

/// `PgBouncer 1.24.1` (or a bare `1.24.1`) to `1.24.1`.
fn version_number(text: &str) -> String {
    text.split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_show_version_text() {
        assert_eq!(version_number("PgBouncer 1.24.1"), "1.24.1");
        assert_eq!(version_number("1.18.0"), "1.18.0");
        assert_eq!(version_number("PgBouncer"), "");
        let facts = |version: &str| PoolerFacts {
            version: version.into(),
            ..Default::default()
        };
        assert_eq!(facts("1.24.1").release(), Some((1, 24)));
        assert_eq!(facts("1.9").release(), Some((1, 9)));
        assert_eq!(facts("").release(), None);
    }
}
