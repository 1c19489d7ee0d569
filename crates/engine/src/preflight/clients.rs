//! Preflight on what the source's clients rely on that pooling or the new server changes:
//! whether each PgBouncer carries prepared statements, session state that transaction pooling
//! breaks and that does not move to the new server (session advisory locks, LISTEN, temporary
//! tables), and md5 password hashes the target's authentication would refuse. All warnings:
//! the upgrade itself works; the clients are what breaks.

use serde::Serialize;
use tokio_postgres::Client;

use super::{Finding, ServerFacts};
use crate::endpoint::Endpoint;
use crate::error::{Result, Side, SqlContext};
use crate::plan::Traffic;
use crate::pooler_facts::{self, PoolerFacts};
use crate::upgrade::Upgrade;

/// What the clients' side of the upgrade shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientFacts {
    pub poolers: Vec<PoolerFacts>,
    pub session_state: Vec<SessionStateUse>,
    /// `pg_notification_queue_usage()` on the source: above 0 while a listener has
    /// notifications it has not read.
    pub notification_queue_usage: f64,
    /// Login roles on the source whose password is an md5 hash (read from pg_authid: superuser
    /// only; empty otherwise).
    pub md5_roles: Vec<String>,
    pub target_password_encryption: String,
    /// The target's pg_hba.conf lines that ask for scram-sha-256; `None` when
    /// pg_hba_file_rules cannot be read.
    pub target_scram_hba_lines: Option<Vec<i32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStateKind {
    /// Session-level advisory locks held by a session outside any transaction.
    AdvisoryLock,
    /// A session whose last statement was LISTEN.
    Listen,
    /// Temporary tables in a session's pg_temp_N schema.
    TempTables,
}

/// One source session that keeps state between transactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionStateUse {
    pub kind: SessionStateKind,
    pub database: String,
    /// `None` for temporary tables on a source before PostgreSQL 16, which cannot tell the
    /// session a pg_temp_N schema belongs to.
    pub pid: Option<i32>,
    pub application_name: String,
    pub client_address: Option<String>,
    /// What the session holds: `2 advisory lock(s)`, `LISTEN orders`, `3 table(s) in pg_temp_4`.
    pub detail: String,
}

impl std::fmt::Display for SessionStateUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(pid) = self.pid else {
            return write!(
                f,
                "{} (a session PostgreSQL before 16 cannot name)",
                self.detail
            );
        };
        match self.application_name.as_str() {
            "" => write!(f, "a session without application_name")?,
            name => write!(f, "{name:?}")?,
        }
        match &self.client_address {
            Some(address) => write!(f, " from {address}")?,
            None => write!(f, " on a local socket")?,
        }
        write!(f, " (pid {pid}): {}", self.detail)
    }
}

/// The pooler consoles the plan pauses.
fn pooler_consoles(traffic: &Traffic) -> Vec<&Endpoint> {
    match traffic {
        Traffic::Pgbouncer(fleet) => fleet.iter().map(|pgbouncer| &pgbouncer.admin).collect(),
        Traffic::Routed(routed) => routed.poolers.iter().collect(),
        Traffic::Direct => Vec::new(),
    }
}

/// Reads the facts: each pooler's console, the source's sessions in the moved databases
/// (pgshift's own left out), its md5 roles, the target's password authentication.
pub(crate) async fn gather(up: &Upgrade, source: &ServerFacts) -> Result<ClientFacts> {
    let poolers = pooler_facts::read_all(&pooler_consoles(&up.plan.traffic)).await?;
    let own = &up.own_source_pids;
    let mut session_state = server_session_state(&up.source_admin, &up.databases, own).await?;
    let existing: Vec<String> = up
        .source_admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname = ANY($1) ORDER BY 1",
            &[&up.databases],
        )
        .await
        .on(Side::Source, "looking for the databases")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for database in existing {
        let client = up.plan.source.with_dbname(&database).connect().await?;
        session_state.extend(temp_tables(&client, &database, source.major(), own).await?);
    }
    let notification_queue_usage = up
        .source_admin
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .on(Side::Source, "reading the notification queue")?
        .get(0);
    let md5_roles = match source.superuser {
        true => up
            .source_admin
            .query(
                "SELECT rolname::text FROM pg_authid WHERE rolcanlogin AND rolpassword LIKE 'md5%' ORDER BY 1",
                &[],
            )
            .await
            .on(Side::Source, "reading password hashes")?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        false => Vec::new(),
    };
    let target_password_encryption = up
        .target_admin
        .query_one("SELECT current_setting('password_encryption')", &[])
        .await
        .on(Side::Target, "reading password_encryption")?
        .get(0);
    // Superusers only (or a role granted SELECT on it): unreadable is a fact too.
    let target_scram_hba_lines = up
        .target_admin
        .query(
            "SELECT line_number FROM pg_hba_file_rules
             WHERE auth_method = 'scram-sha-256' AND error IS NULL AND database <> ARRAY['replication']
             ORDER BY 1",
            &[],
        )
        .await
        .ok()
        .map(|rows| rows.iter().map(|r| r.get(0)).collect());
    Ok(ClientFacts {
        poolers,
        session_state,
        notification_queue_usage,
        md5_roles,
        target_password_encryption,
        target_scram_hba_lines,
    })
}

/// pgshift's own sessions: this process's, and another pgshift's (its application_name).
const NOT_PGSHIFT: &str =
    "NOT (a.pid = ANY($2)) AND coalesce(a.application_name, '') NOT LIKE 'pgshift %'";

/// Session advisory locks and LISTENing sessions in the moved databases: both server-wide
/// views. A lock held by a session outside any transaction is a session-level lock.
async fn server_session_state(
    source: &Client,
    databases: &[String],
    own_pids: &[i32],
) -> Result<Vec<SessionStateUse>> {
    let locks = source
        .query(
            &format!(
                "SELECT a.datname::text, a.pid, coalesce(a.application_name, ''), host(a.client_addr),
                        count(*)::text || ' advisory lock(s)'
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.granted AND a.state = 'idle'
                   AND a.datname = ANY($1) AND {NOT_PGSHIFT}
                 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2"
            ),
            &[&databases, &own_pids],
        )
        .await
        .on(Side::Source, "looking for session advisory locks")?;
    let listens = source
        .query(
            &format!(
                "SELECT a.datname::text, a.pid, coalesce(a.application_name, ''), host(a.client_addr),
                        left(btrim(a.query), 80)
                 FROM pg_stat_activity a
                 WHERE a.state = 'idle' AND a.query ~* '^\\s*listen\\s' AND a.datname = ANY($1) AND {NOT_PGSHIFT}
                 ORDER BY 1, 2"
            ),
            &[&databases, &own_pids],
        )
        .await
        .on(Side::Source, "looking for LISTENing sessions")?;
    let uses = |kind, rows: Vec<tokio_postgres::Row>| {
        rows.into_iter().map(move |r| SessionStateUse {
            kind,
            database: r.get(0),
            pid: Some(r.get(1)),
            application_name: r.get(2),
            client_address: r.get(3),
            detail: r.get(4),
        })
    };
    Ok(uses(SessionStateKind::AdvisoryLock, locks)
        .chain(uses(SessionStateKind::Listen, listens))
        .collect())
}

/// Temporary tables in one database, by pg_temp_N schema. From PostgreSQL 16 on, N is the
/// backend id the statistics functions take, which names the session; before, it is not.
async fn temp_tables(
    source: &Client,
    database: &str,
    major: i32,
    own_pids: &[i32],
) -> Result<Vec<SessionStateUse>> {
    let rows = source
        .query(
            &format!(
                "WITH t AS (
                     SELECT n.nspname::text AS schema, count(*) AS tables,
                            CASE WHEN $1 THEN pg_stat_get_backend_pid(substr(n.nspname, 9)::int) END AS pid
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname ~ '^pg_temp_[0-9]+$' AND c.relkind IN ('r', 'p')
                     GROUP BY n.nspname)
                 SELECT t.schema, t.tables::text, t.pid, coalesce(a.application_name, ''), host(a.client_addr)
                 FROM t LEFT JOIN pg_stat_activity a ON a.pid = t.pid
                 -- From 16 on a schema without a session holds a crashed session's leftovers.
                 WHERE NOT $1 OR (a.pid IS NOT NULL AND {NOT_PGSHIFT})
                 ORDER BY 1"
            ),
            &[&(major >= 16), &own_pids],
        )
        .await
        .on(Side::Source, "looking for temporary tables")?;
    Ok(rows
        .iter()
        .map(|r| SessionStateUse {
            kind: SessionStateKind::TempTables,
            database: database.to_string(),
            pid: r.get(2),
            application_name: r.get(3),
            client_address: r.get(4),
            detail: format!(
                "{} table(s) in {}",
                r.get::<_, String>(1),
                r.get::<_, String>(0)
            ),
        })
        .collect())
}

/// The clients' warnings.
pub fn warnings(facts: &ClientFacts) -> Vec<Finding> {
    let mut warnings = pooler_warnings(&facts.poolers);
    warnings.extend(session_state_warnings(
        &facts.session_state,
        facts.notification_queue_usage,
    ));
    warnings.extend(md5_warnings(facts));
    warnings
}

const NOT_PREPARING: &str = "or make the clients not prepare statements on the server: \
     psycopg prepare_threshold=None, asyncpg statement_cache_size=0, pgjdbc prepareThreshold=0";

/// Per PgBouncer: whether clients' prepared statements survive a change of server connection
/// (and so the cutover), and whether its pooling mode lets PAUSE finish.
pub fn pooler_warnings(poolers: &[PoolerFacts]) -> Vec<Finding> {
    let mut warnings = Vec::new();
    for pooler in poolers {
        let object = format!("PgBouncer {}", pooler.console);
        let consequence = "clients that prepare statements on the server (pgjdbc, asyncpg, psycopg 3 and \
             `pgbench -M prepared` do by default) fail with \"prepared statement ... does not exist\" whenever \
             a transaction gets another server connection, and at the cutover every one of them does";
        match pooler.pool_mode.as_str() {
            "transaction" | "statement" => {}
            "session" => {
                warnings.push(Finding {
                    code: "pgbouncer_session_pooling",
                    object,
                    problem: "runs pool_mode = session: PAUSE waits until every client has disconnected, so \
                              pgshift's fence waits for each connected client and the cutover aborts at \
                              --max-pause while any stays connected"
                        .into(),
                    fix: "switch it to pool_mode = transaction (read the user guide's \"Session state and \
                          transaction pooling\" first), or have the clients disconnect for the cutover"
                        .into(),
                });
                continue;
            }
            _ => continue,
        }
        let too_old = pooler.max_prepared_statements.is_none()
            || pooler.release().is_some_and(|release| release < (1, 21));
        if too_old {
            let version = match pooler.version.as_str() {
                "" => "an unknown version".to_string(),
                version => version.to_string(),
            };
            warnings.push(Finding {
                code: "pgbouncer_prepared_statements",
                object,
                problem: format!(
                    "is {version}, older than 1.21, which cannot carry prepared statements in pool_mode = {}: \
                     {consequence}",
                    pooler.pool_mode
                ),
                fix: format!(
                    "upgrade PgBouncer to 1.21 or newer and set max_prepared_statements = 200, {NOT_PREPARING}"
                ),
            });
        } else if pooler.max_prepared_statements == Some(0) {
            warnings.push(Finding {
                code: "pgbouncer_prepared_statements",
                object,
                problem: format!(
                    "has max_prepared_statements = 0, so it does not carry prepared statements in pool_mode = {}: \
                     {consequence}",
                    pooler.pool_mode
                ),
                fix: format!("set max_prepared_statements = 200 in its [pgbouncer] section and RELOAD it, {NOT_PREPARING}"),
            });
        }
    }
    warnings
}

/// At most this many sessions are named in one warning.
const SESSIONS_NAMED: usize = 10;

/// One warning per kind of session state and database, naming its sessions.
pub fn session_state_warnings(uses: &[SessionStateUse], queue_usage: f64) -> Vec<Finding> {
    let mut warnings = Vec::new();
    let mut databases: Vec<&str> = uses.iter().map(|u| u.database.as_str()).collect();
    databases.sort();
    databases.dedup();
    for kind in [
        SessionStateKind::AdvisoryLock,
        SessionStateKind::Listen,
        SessionStateKind::TempTables,
    ] {
        for database in &databases {
            let sessions: Vec<&SessionStateUse> = uses
                .iter()
                .filter(|u| u.kind == kind && u.database == *database)
                .collect();
            if sessions.is_empty() {
                continue;
            }
            let mut named: Vec<String> = sessions
                .iter()
                .take(SESSIONS_NAMED)
                .map(|u| u.to_string())
                .collect();
            if sessions.len() > SESSIONS_NAMED {
                named.push(format!("and {} more", sessions.len() - SESSIONS_NAMED));
            }
            let named = named.join("; ");
            let object = format!("database {database}");
            warnings.push(match kind {
                SessionStateKind::AdvisoryLock => Finding {
                    code: "session_advisory_locks",
                    object,
                    problem: format!(
                        "has session advisory locks held between transactions, by {named}. A session lock belongs to \
                         the server session: through PgBouncer in transaction mode another client can take it again \
                         and its owner may fail to release it, and it does not move to the new server: after the \
                         cutover nobody holds it there"
                    ),
                    fix: "take such locks with pg_advisory_xact_lock inside the transaction that needs them, or \
                          connect those clients to the server directly (not through transaction pooling) and have \
                          them take their locks again when they reconnect after the cutover"
                        .into(),
                },
                SessionStateKind::Listen => Finding {
                    code: "listen",
                    object,
                    problem: format!(
                        "has sessions that LISTEN, by {named}. Notifications reach the server session that \
                         listened: through PgBouncer in transaction mode the client no longer holds it, and after \
                         the cutover NOTIFY runs on the new server, where nobody listens until the client \
                         LISTENs again there"
                    ),
                    fix: "connect listeners to the server directly (not through transaction pooling) and have them \
                          LISTEN again whenever they reconnect, to the new server after the cutover too"
                        .into(),
                },
                SessionStateKind::TempTables => Finding {
                    code: "temp_tables",
                    object,
                    problem: format!(
                        "has temporary tables kept between transactions, by {named}. A temporary table belongs to \
                         the server session: through PgBouncer in transaction mode other clients see it and its \
                         creator may not, and it is not replicated: the new server starts without it"
                    ),
                    fix: "create temporary tables inside the transaction that uses them (CREATE TEMP TABLE … ON \
                          COMMIT DROP), or connect those clients directly and have them create the tables again \
                          when they reconnect after the cutover"
                        .into(),
                },
            });
        }
    }
    if queue_usage > 0.0 {
        warnings.push(Finding {
            code: "notification_queue",
            object: "source server".into(),
            problem: format!(
                "has {:.4}% of its notification queue in use: a session LISTENs and has not read its \
                 notifications yet; notifications left unread on the old server at the cutover are not delivered \
                 on the new one",
                queue_usage * 100.0
            ),
            fix: "find the listener (pg_stat_activity on the source) and connect it as the listen warning says"
                .into(),
        });
    }
    warnings
}

/// Roles whose md5 hash the target would refuse, and PgBouncers that cannot log them in.
pub fn md5_warnings(facts: &ClientFacts) -> Vec<Finding> {
    let mut warnings = Vec::new();
    if facts.md5_roles.is_empty() {
        return warnings;
    }
    let target_demands = match &facts.target_scram_hba_lines {
        Some(lines) if lines.is_empty() => None,
        Some(lines) => Some(format!(
            "the target's pg_hba.conf asks for scram-sha-256 (line(s) {}), which cannot check an md5 hash",
            lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None if facts.target_password_encryption == "scram-sha-256" => Some(
            "the target hashes passwords with scram-sha-256 (password_encryption), and where its pg_hba.conf \
             asks for scram-sha-256 (pgshift's login may not read pg_hba_file_rules) an md5 hash cannot log in"
                .to_string(),
        ),
        None => None,
    };
    if let Some(demands) = target_demands {
        for role in &facts.md5_roles {
            warnings.push(Finding {
                code: "md5_password",
                object: format!("role {role}"),
                problem: format!(
                    "has an md5 password hash, which pgshift copies to the target as it is; {demands}: after the \
                     cutover this role cannot log in to the target"
                ),
                fix: format!(
                    "set its password again as SCRAM before the upgrade: on the source, SET password_encryption = \
                     'scram-sha-256' and ALTER ROLE {} PASSWORD '…' (psql's \\password does both), or the same on \
                     the target after pgshift copied the schema, before the cutover",
                    crate::sql::ident(role)
                ),
            });
        }
    }
    for pooler in &facts.poolers {
        if pooler.auth_type != "scram-sha-256" {
            continue;
        }
        warnings.push(Finding {
            code: "pgbouncer_md5_password",
            object: format!("PgBouncer {}", pooler.console),
            problem: format!(
                "has auth_type = scram-sha-256, and role(s) {} have an md5 password hash: PgBouncer's login as \
                 such a role fails when it checks the password against that hash (auth_query, or an auth_file \
                 entry holding it)",
                facts.md5_roles.join(", ")
            ),
            fix: "set those roles' passwords again as SCRAM (SET password_encryption = 'scram-sha-256', then ALTER \
                  ROLE … PASSWORD), or give PgBouncer their passwords in auth_file as plain text or SCRAM secrets"
                .into(),
        });
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooler(version: &str, max_prepared_statements: Option<i64>, pool_mode: &str) -> PoolerFacts {
        PoolerFacts {
            console: "10.0.0.7:6432".into(),
            version: version.into(),
            max_prepared_statements,
            pool_mode: pool_mode.into(),
            auth_type: "md5".into(),
        }
    }

    fn codes(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_pgbouncer_before_1_21_in_transaction_mode_warns_with_both_fixes() {
        let warnings = pooler_warnings(&[pooler("1.18.0", None, "transaction")]);
        assert_eq!(codes(&warnings), ["pgbouncer_prepared_statements"]);
        assert_eq!(warnings[0].object, "PgBouncer 10.0.0.7:6432");
        assert!(warnings[0]
            .problem
            .starts_with("is 1.18.0, older than 1.21, which cannot carry prepared statements in pool_mode = transaction"));
        for fix in [
            "upgrade PgBouncer to 1.21 or newer and set max_prepared_statements",
            "psycopg prepare_threshold=None",
            "asyncpg statement_cache_size=0",
            "pgjdbc prepareThreshold=0",
        ] {
            assert!(warnings[0].fix.contains(fix), "{}", warnings[0].fix);
        }
    }

    #[test]
    fn max_prepared_statements_0_warns_and_a_positive_one_does_not() {
        let warnings = pooler_warnings(&[pooler("1.24.1", Some(0), "statement")]);
        assert_eq!(codes(&warnings), ["pgbouncer_prepared_statements"]);
        assert!(warnings[0]
            .problem
            .starts_with("has max_prepared_statements = 0"));
        assert!(warnings[0]
            .fix
            .starts_with("set max_prepared_statements = 200"));
        assert!(pooler_warnings(&[pooler("1.24.1", Some(200), "transaction")]).is_empty());
        assert!(pooler_warnings(&[pooler("1.21.0", Some(100), "transaction")]).is_empty());
    }

    #[test]
    fn session_pooling_warns_that_pause_waits_for_clients_and_not_about_prepared_statements() {
        let warnings = pooler_warnings(&[
            pooler("1.18.0", None, "session"),
            pooler("1.24.1", Some(0), "session"),
        ]);
        assert_eq!(
            codes(&warnings),
            ["pgbouncer_session_pooling", "pgbouncer_session_pooling"]
        );
        assert!(warnings[0]
            .problem
            .contains("PAUSE waits until every client has disconnected"));
    }

    #[test]
    fn every_pooler_of_a_fleet_is_judged() {
        let warnings = pooler_warnings(&[
            pooler("1.24.1", Some(200), "transaction"),
            PoolerFacts {
                console: "10.0.0.8:6432".into(),
                ..pooler("1.20.1", None, "transaction")
            },
        ]);
        assert_eq!(codes(&warnings), ["pgbouncer_prepared_statements"]);
        assert_eq!(warnings[0].object, "PgBouncer 10.0.0.8:6432");
    }

    fn session(kind: SessionStateKind, database: &str, pid: i32, name: &str) -> SessionStateUse {
        SessionStateUse {
            kind,
            database: database.into(),
            pid: Some(pid),
            application_name: name.into(),
            client_address: Some("10.1.2.3/32".into()),
            detail: "1 advisory lock(s)".into(),
        }
    }

    #[test]
    fn session_state_is_one_warning_per_kind_and_database_naming_the_sessions() {
        let uses = [
            session(SessionStateKind::AdvisoryLock, "app", 101, "worker"),
            session(SessionStateKind::AdvisoryLock, "app", 102, ""),
            session(SessionStateKind::Listen, "app", 103, "notifier"),
            session(SessionStateKind::TempTables, "billing", 104, "reports"),
            SessionStateUse {
                pid: None,
                detail: "2 table(s) in pg_temp_3".into(),
                ..session(SessionStateKind::TempTables, "billing", 0, "")
            },
        ];
        let warnings = session_state_warnings(&uses, 0.0);
        assert_eq!(
            codes(&warnings),
            ["session_advisory_locks", "listen", "temp_tables"]
        );
        assert_eq!(warnings[0].object, "database app");
        assert!(warnings[0].problem.contains(
            "by \"worker\" from 10.1.2.3/32 (pid 101): 1 advisory lock(s); a session without application_name \
             from 10.1.2.3/32 (pid 102)"
        ));
        assert!(warnings[0].fix.contains("pg_advisory_xact_lock"));
        assert!(warnings[1].problem.contains("\"notifier\""));
        assert_eq!(warnings[2].object, "database billing");
        assert!(warnings[2].problem.contains(
            "(pid 104): 1 advisory lock(s); 2 table(s) in pg_temp_3 (a session PostgreSQL before 16 cannot name)"
        ));
        assert!(session_state_warnings(&[], 0.0).is_empty());
        assert_eq!(
            codes(&session_state_warnings(&[], 0.0001)),
            ["notification_queue"]
        );
    }

    #[test]
    fn many_sessions_are_counted_beyond_the_tenth() {
        let uses: Vec<SessionStateUse> = (0..12)
            .map(|pid| session(SessionStateKind::Listen, "app", pid, "n"))
            .collect();
        let warnings = session_state_warnings(&uses, 0.0);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].problem.contains("(pid 9)"));
        assert!(!warnings[0].problem.contains("(pid 10)"));
        assert!(warnings[0].problem.contains("and 2 more"));
    }

    fn md5_facts() -> ClientFacts {
        ClientFacts {
            md5_roles: vec!["legacy".into(), "Old App".into()],
            target_password_encryption: "scram-sha-256".into(),
            target_scram_hba_lines: Some(vec![3, 4]),
            ..Default::default()
        }
    }

    #[test]
    fn md5_roles_are_named_when_the_target_asks_for_scram() {
        let warnings = md5_warnings(&md5_facts());
        assert_eq!(codes(&warnings), ["md5_password", "md5_password"]);
        assert_eq!(warnings[1].object, "role Old App");
        assert!(warnings[0]
            .problem
            .contains("the target's pg_hba.conf asks for scram-sha-256 (line(s) 3, 4)"));
        assert!(warnings[1]
            .fix
            .contains("ALTER ROLE \"Old App\" PASSWORD '…'"));
        // pg_hba.conf without scram lines: the md5 hashes still log in.
        let md5_hba = ClientFacts {
            target_scram_hba_lines: Some(Vec::new()),
            ..md5_facts()
        };
        assert!(md5_warnings(&md5_hba).is_empty());
        // Unreadable pg_hba.conf: password_encryption is the hint.
        let unreadable = ClientFacts {
            target_scram_hba_lines: None,
            ..md5_facts()
        };
        assert_eq!(md5_warnings(&unreadable).len(), 2);
        let md5_target = ClientFacts {
            target_password_encryption: "md5".into(),
            ..unreadable
        };
        assert!(md5_warnings(&md5_target).is_empty());
        assert!(md5_warnings(&ClientFacts::default()).is_empty());
    }

    #[test]
    fn a_scram_pgbouncer_cannot_log_in_md5_roles() {
        let facts = ClientFacts {
            target_scram_hba_lines: Some(Vec::new()),
            poolers: vec![
                PoolerFacts {
                    auth_type: "scram-sha-256".into(),
                    ..pooler("1.24.1", Some(200), "transaction")
                },
                pooler("1.24.1", Some(200), "transaction"),
            ],
            ..md5_facts()
        };
        let warnings = md5_warnings(&facts);
        assert_eq!(codes(&warnings), ["pgbouncer_md5_password"]);
        assert!(warnings[0]
            .problem
            .contains("role(s) legacy, Old App have an md5 password hash"));
    }
}
