//! pgshift's own sessions on the servers: how they are opened and prepared.
//!
//! Some of pgshift's statements carry secrets: `CREATE SUBSCRIPTION` holds the source password
//! in its connection string, `CREATE ROLE` a copied password hash. PostgreSQL would write them
//! to its log under `log_statement`, `log_min_duration_statement` or the sampling settings, and
//! with every failing statement at default settings (`log_min_error_statement = error`), and
//! pg_stat_statements would keep them in its query-text file. So every session pgshift opens
//! first turns all of that off for itself, where its role may.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::endpoint::Endpoint;
use crate::error::{Result, Side, SqlContext};
use crate::sql;

/// Settings that put a session's statements into the server log (or pg_stat_statements' file),
/// and the value that keeps them out. Every major from 13 to 18 has all of the core ones; the
/// `debug_print_*` ones any role may set, the others need a superuser or (PostgreSQL 15+)
/// `GRANT SET ON PARAMETER`. pg_stat_statements' setting exists only where it is loaded.
/// (`log_statement_sample_rate` only thins out what `log_min_duration_sample` logs: nothing.)
pub const QUIET_SETTINGS: &[(&str, &str)] = &[
    ("log_statement", "none"),
    ("log_min_error_statement", "panic"),
    ("log_min_duration_statement", "-1"),
    ("log_min_duration_sample", "-1"),
    ("log_transaction_sample_rate", "0"),
    ("debug_print_parse", "off"),
    ("debug_print_rewritten", "off"),
    ("debug_print_plan", "off"),
    ("pg_stat_statements.track", "none"),
];

/// Opens a pgshift session: writes are allowed in it even where the database is read-only,
/// and its statements stay out of the server's log where the role may arrange that (preflight
/// reports where it may not: [`loud_settings`]).
pub(crate) async fn open(endpoint: &Endpoint) -> Result<(Client, i32)> {
    let client = endpoint.connect().await?;
    let messages = client
        .simple_query(
            "SET default_transaction_read_only = off; \
             SELECT pg_backend_pid(), current_setting('server_version_num')",
        )
        .await
        .on(endpoint.side, "preparing the session")?;
    let (pid, version_num) = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some((
                row.get(0).and_then(|p| p.parse().ok()).unwrap_or_default(),
                row.get(1).and_then(|v| v.parse().ok()).unwrap_or_default(),
            )),
            _ => None,
        })
        .unwrap_or_default();
    client
        .batch_execute(&quiet_session(may_set_privileged(version_num)))
        .await
        .on(
            endpoint.side,
            "turning statement logging off for pgshift's session",
        )?;
    Ok((client, pid))
}

/// SQL that tells whether the session's role may set the superuser-only setting `s.name`:
/// `GRANT SET ON PARAMETER` exists from PostgreSQL 15 on (and a superuser holds every
/// privilege); before, only a superuser may.
pub fn may_set_privileged(version_num: i32) -> &'static str {
    if version_num >= 150000 {
        "pg_catalog.has_parameter_privilege(s.name, 'SET')"
    } else {
        "(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)"
    }
}

/// One statement that sets, for the rest of the session, each of [`QUIET_SETTINGS`] that the
/// server has and the role may set (`may_set`, see [`may_set_privileged`]), and leaves the
/// others alone: it never fails for want of a privilege. Also the opening of psql's restore
/// script.
pub fn quiet_session(may_set: &str) -> String {
    let values: Vec<String> = QUIET_SETTINGS
        .iter()
        .map(|(name, value)| format!("({}, {})", sql::literal(name), sql::literal(value)))
        .collect();
    format!(
        "SELECT count(pg_catalog.set_config(s.name, q.value, false)) \
         FROM (VALUES {}) AS q(name, value) JOIN pg_catalog.pg_settings s ON s.name = q.name \
         WHERE s.context = 'user' OR {may_set}",
        values.join(", ")
    )
}

/// The settings of [`QUIET_SETTINGS`] that this session could not turn off: under them, the
/// server would log pgshift's statements (secrets included). Empty for a superuser.
pub async fn loud_settings(client: &Client, side: Side) -> Result<Vec<String>> {
    let (names, values): (Vec<&str>, Vec<&str>) = QUIET_SETTINGS.iter().copied().unzip();
    Ok(client
        .query(
            // A setting the server lacks (an extension's, when it is not loaded) logs nothing.
            "SELECT q.name FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(name, value, n)
             WHERE current_setting(q.name, true) <> q.value ORDER BY q.n",
            &[&names, &values],
        )
        .await
        .on(side, "reading the session's logging settings")?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quiet_statement_lists_every_setting_and_the_privilege_test() {
        let statement = quiet_session(may_set_privileged(180000));
        for (name, value) in QUIET_SETTINGS {
            assert!(
                statement.contains(&format!("('{name}', '{value}')")),
                "{statement}"
            );
        }
        assert!(statement.ends_with("has_parameter_privilege(s.name, 'SET')"));
        assert!(may_set_privileged(140010).contains("rolsuper"));
    }
}
