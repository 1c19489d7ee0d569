//! Preflight (DESIGN.md §3.1): read-only checks of source, target and tools. Facts are
//! gathered over connections; the verdict (`evaluate`) is pure and unit-tested.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Result, Side, SqlContext};
use crate::names;
use crate::schema::Tools;
use crate::sql;
use crate::upgrade::Upgrade;

pub mod clients;

/// A problem found, the object it concerns and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub object: String,
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.object, self.problem, self.fix)
    }
}

/// Server-wide facts about one side.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFacts {
    pub version: String,
    pub version_num: i32,
    pub user: String,
    pub superuser: bool,
    /// Settings under which pgshift's own session would still have its statements logged
    /// (its role may not turn them off); empty when none.
    pub statement_logging: Vec<String>,
    pub wal_level: String,
    pub max_replication_slots: i64,
    pub slots_in_use: i64,
    pub max_wal_senders: i64,
    pub senders_in_use: i64,
    pub max_logical_replication_workers: i64,
    pub max_worker_processes: i64,
    pub max_sync_workers_per_subscription: i64,
    /// Logical replication workers that subscriptions other than pgshift's hold or will start.
    pub logical_workers_taken: i64,
    pub system_identifier: String,
}

impl ServerFacts {
    pub fn major(&self) -> i32 {
        self.version_num / 10000
    }
}

/// Facts about one database to be migrated, read on the source (and its target twin).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatabaseFacts {
    pub name: String,
    pub exists_on_source: bool,
    pub tables: i64,
    pub bytes: i64,
    pub sequences: i64,
    /// Tables whose UPDATE/DELETE cannot be replicated: no primary key, no replica identity.
    pub tables_without_identity: Vec<String>,
    pub unlogged_tables: Vec<String>,
    pub materialized_views: Vec<String>,
    pub large_objects: i64,
    /// Extensions installed on the source that the target cannot install.
    pub extensions_missing_on_target: Vec<String>,
    /// User tables already in the target database that pgshift did not put there.
    pub foreign_tables_on_target: Vec<String>,
    /// Tablespaces the database's tables, indexes or default use on the source that the target
    /// server does not have: the schema restore would fail on them.
    pub tablespaces_missing_on_target: Vec<String>,
    /// Foreign tables (relkind 'f'): their rows live behind a foreign-data wrapper.
    pub fdw_tables: Vec<FdwTable>,
}

/// A foreign table and the foreign server its rows come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FdwTable {
    pub table: String,
    pub server: String,
    pub wrapper: String,
}

/// How the target server relates to the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetIdentity {
    #[default]
    Distinct,
    /// The target URL reaches the source server itself.
    SourceItself,
    /// Another server with the source's system identifier: a standby or a restored backup.
    CopyOfSource,
}

/// What the client tools found at `--pg-bin-dir` (or PATH) can do.
#[derive(Debug, Clone, Serialize)]
pub struct ToolFacts {
    pub pg_dump: Option<String>,
    pub pg_dump_major: Option<i32>,
    pub psql_found: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub source: ServerFacts,
    pub target: ServerFacts,
    pub tools: ToolFacts,
    pub databases: Vec<DatabaseFacts>,
    /// True when pgshift objects from an earlier run exist: the run resumes, it is no blocker.
    pub resuming: bool,
    /// The plan opens a rollback window at the switch: the target publishes, the source
    /// subscribes.
    pub rollback_window: bool,
    pub target_identity: TargetIdentity,
    pub clients: clients::ClientFacts,
    /// What pgshift's role may do on each server.
    pub privileges: crate::privilege::Privileges,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source_version: String,
    pub target_version: String,
    pub databases: Vec<DatabaseFacts>,
    /// Each PgBouncer in front of the source, as its console reports it.
    pub poolers: Vec<crate::pooler_facts::PoolerFacts>,
    pub blockers: Vec<Finding>,
    pub warnings: Vec<Finding>,
    /// The privilege model detected on each side.
    pub privileges: crate::privilege::Privileges,
}

impl Report {
    pub fn ready(&self) -> bool {
        self.blockers.is_empty()
    }
}

/// The verdict: which facts block an upgrade and which deserve a warning.
pub fn evaluate(facts: &Facts) -> Report {
    let mut blockers = Vec::new();
    let mut warnings = Vec::new();
    let mut block = |code, object: String, problem: String, fix: String| {
        blockers.push(Finding {
            code,
            object,
            problem,
            fix,
        })
    };
    let (source, target) = (&facts.source, &facts.target);

    match facts.target_identity {
        // Every other check would compare the server with itself.
        TargetIdentity::SourceItself => {
            return Report {
                source_version: source.version.clone(),
                target_version: target.version.clone(),
                databases: facts.databases.clone(),
                poolers: facts.clients.poolers.clone(),
                blockers: vec![Finding {
                    code: "target_is_source",
                    object: "target server".into(),
                    problem: "is the source server itself (pgshift's source session shows among the target's sessions); \
                              run would make the source read-only and subscribe it to itself"
                        .into(),
                    fix: "point --target at the new server (another host or port), not at the source".into(),
                }],
                warnings: Vec::new(),
                privileges: facts.privileges.clone(),
            };
        }
        TargetIdentity::CopyOfSource => block(
            "target_copy_of_source",
            "target server".into(),
            format!(
                "has the source's system identifier {}: it is a physical copy of the source (a standby or a \
                 restored backup), and pgshift tells the two servers apart by that identifier",
                source.system_identifier
            ),
            "point --target at a new server initialised on its own (initdb)".into(),
        ),
        TargetIdentity::Distinct => {}
    }
    if target.major() < source.major() {
        block(
            "target_older",
            "target server".into(),
            format!("runs PostgreSQL {} but the source runs {}", target.version, source.version),
            "a major-version upgrade goes to the same or a newer major: point --target at a newer server".into(),
        );
    }
    if target.major() < OLDEST_TARGET_MAJOR {
        block(
            "target_unsupported",
            "target server".into(),
            format!(
                "runs PostgreSQL {}; pgshift upgrades to PostgreSQL {OLDEST_TARGET_MAJOR} or newer (it follows the \
                 initial copy in pg_stat_progress_copy, {OLDEST_TARGET_MAJOR}+)",
                target.version
            ),
            format!("point --target at a server of PostgreSQL {OLDEST_TARGET_MAJOR} or newer"),
        );
    }
    if source.wal_level != "logical" {
        block(
            "wal_level",
            "source server".into(),
            format!(
                "has wal_level = {}, logical replication needs logical",
                source.wal_level
            ),
            "run ALTER SYSTEM SET wal_level = logical on the source and restart it".into(),
        );
    }
    // The servers that receive a password in a statement: the target (the subscription to the
    // source), and with a rollback window the source too (its subscription to the target).
    let receiving: &[(&str, &ServerFacts, &str)] = if facts.rollback_window {
        &[("target", target, "source"), ("source", source, "target")]
    } else {
        &[("target", target, "source")]
    };
    for (side, server, other) in receiving {
        if server.statement_logging.is_empty() {
            continue;
        }
        let settings = server.statement_logging.join(", ");
        block(
            "statement_logging",
            format!("{side} user {}", server.user),
            format!(
                "may not turn off {settings} for its sessions; the {side}'s log would receive \
                 pgshift's statements, among them a subscription's connection string with the \
                 {other} password"
            ),
            format!(
                "connect to the {side} as a superuser, or (PostgreSQL 15+) GRANT SET ON PARAMETER \
                 {settings} TO {}",
                crate::sql::ident(&server.user)
            ),
        );
    }
    if facts.rollback_window {
        window_blockers(facts, &mut block);
    }
    for finding in crate::privilege::blockers(&facts.privileges, facts.rollback_window) {
        block(finding.code, finding.object, finding.problem, finding.fix);
    }
    let databases = facts.databases.len() as i64;
    // One slot per database, plus the table-sync workers' temporary slots (two per subscription).
    let slots_needed = databases * 3;
    if !facts.resuming && source.max_replication_slots - source.slots_in_use < slots_needed {
        block(
            "replication_slots",
            "source server".into(),
            format!(
                "has {} of max_replication_slots = {} in use; pgshift needs {slots_needed} free",
                source.slots_in_use, source.max_replication_slots
            ),
            format!(
                "raise max_replication_slots on the source to at least {} and restart it",
                source.slots_in_use + slots_needed
            ),
        );
    }
    if !facts.resuming && source.max_wal_senders - source.senders_in_use < slots_needed {
        block(
            "wal_senders",
            "source server".into(),
            format!(
                "has {} of max_wal_senders = {} in use; pgshift needs {slots_needed} free",
                source.senders_in_use, source.max_wal_senders
            ),
            format!(
                "raise max_wal_senders on the source to at least {} and restart it",
                source.senders_in_use + slots_needed
            ),
        );
    }
    // One apply worker per database and at least one table-sync worker, or no copy starts.
    let workers_needed = databases + 1;
    let taken = target.logical_workers_taken;
    let workers_free = target.max_logical_replication_workers - taken;
    if workers_free < workers_needed {
        let held = match taken {
            0 => String::new(),
            n => format!(" with {n} taken by other subscriptions"),
        };
        block(
            "logical_workers",
            "target server".into(),
            format!(
                "has max_logical_replication_workers = {}{held}; pgshift needs {workers_needed} (an apply worker \
                 for each of {databases} database(s) and at least one table-sync worker)",
                target.max_logical_replication_workers
            ),
            format!(
                "raise max_logical_replication_workers on the target to at least {} and restart it",
                taken + workers_needed
            ),
        );
    } else if workers_free < databases * 3 {
        warnings.push(Finding {
            code: "logical_workers",
            object: "target server".into(),
            problem: format!(
                "has {workers_free} logical replication workers free; the initial copy runs slowly with fewer than {} \
                 (an apply and two table-sync workers per database)",
                databases * 3
            ),
            fix: "raise max_logical_replication_workers (and max_worker_processes) on the target".into(),
        });
    }
    // Logical replication workers are background workers, as is their launcher.
    let processes_needed = 1 + taken + workers_needed;
    if target.max_worker_processes < processes_needed {
        block(
            "worker_processes",
            "target server".into(),
            format!(
                "has max_worker_processes = {}; the logical replication launcher and {} replication workers need {processes_needed}",
                target.max_worker_processes,
                taken + workers_needed
            ),
            format!("raise max_worker_processes on the target to at least {processes_needed} and restart it"),
        );
    }
    if target.max_sync_workers_per_subscription < 1 {
        block(
            "sync_workers",
            "target server".into(),
            format!(
                "has max_sync_workers_per_subscription = {}: no table's initial copy can start",
                target.max_sync_workers_per_subscription
            ),
            "set max_sync_workers_per_subscription = 2 on the target and reload it".into(),
        );
    }
    match facts.tools.pg_dump_major {
        None => block(
            "pg_dump_missing",
            "pg_dump".into(),
            "was not found (pgshift copies the schema with pg_dump and psql)".into(),
            format!(
                "install the PostgreSQL {} client tools and pass their bin directory with --pg-bin-dir",
                target.major()
            ),
        ),
        Some(major) if major < source.major() || major != target.major() => block(
            "pg_dump_version",
            format!("pg_dump {}", facts.tools.pg_dump.clone().unwrap_or_default()),
            format!(
                "cannot be used: the schema must be dumped by the target's major ({}); the source is {}",
                target.major(),
                source.major()
            ),
            format!(
                "install the PostgreSQL {} client tools and pass their bin directory with --pg-bin-dir",
                target.major()
            ),
        ),
        Some(_) => {}
    }
    if facts.tools.pg_dump_major.is_some() && !facts.tools.psql_found {
        block(
            "psql_missing",
            "psql".into(),
            "was not found next to pg_dump".into(),
            format!(
                "install the PostgreSQL {} client tools (psql)",
                target.major()
            ),
        );
    }

    for db in &facts.databases {
        if !db.exists_on_source {
            block(
                "database_missing",
                format!("database {}", db.name),
                "does not exist on the source".into(),
                "check --databases".into(),
            );
            continue;
        }
        for table in &db.tables_without_identity {
            block(
                "no_replica_identity",
                format!("table {table} (database {})", db.name),
                "has no primary key or replica identity; its UPDATEs and DELETEs cannot be replicated".into(),
                format!("ALTER TABLE {table} REPLICA IDENTITY FULL, or add a primary key"),
            );
        }
        if db.large_objects > 0 {
            block(
                "large_objects",
                format!("database {}", db.name),
                format!("holds {} large objects, which logical replication does not carry", db.large_objects),
                "move them to bytea columns, or copy them separately after the upgrade and accept they are not kept in sync".into(),
            );
        }
        for tablespace in &db.tablespaces_missing_on_target {
            block(
                "tablespace_missing",
                format!("tablespace {tablespace} (database {})", db.name),
                "holds objects of the database on the source but does not exist on the target; the schema copy would fail".into(),
                format!(
                    "create a tablespace named {tablespace} on the target (CREATE TABLESPACE {} LOCATION '...'), or move the objects to pg_default on the source",
                    crate::sql::ident(tablespace)
                ),
            );
        }
        for extension in &db.extensions_missing_on_target {
            block(
                "extension_missing",
                format!("extension {extension} (database {})", db.name),
                "is installed on the source but not available on the target".into(),
                format!(
                    "install the {extension} extension's package for PostgreSQL {} on the target",
                    target.major()
                ),
            );
        }
        if let Some(example) = db.foreign_tables_on_target.first() {
            block(
                "target_not_empty",
                format!("database {} on the target", db.name),
                format!(
                    "already holds {} table(s) pgshift did not create, e.g. {example}",
                    db.foreign_tables_on_target.len()
                ),
                "point --target at an empty server, or drop that database on the target".into(),
            );
        }
        for table in &db.unlogged_tables {
            warnings.push(Finding {
                code: "unlogged_table",
                object: format!("table {table} (database {})", db.name),
                problem: "is UNLOGGED; logical replication does not carry its rows, it will be empty on the target".into(),
                fix: format!("ALTER TABLE {table} SET LOGGED before the upgrade if its contents matter"),
            });
        }
        for foreign in &db.fdw_tables {
            warnings.push(Finding {
                code: "foreign_table",
                object: format!("foreign table {} (database {})", foreign.table, db.name),
                problem: format!(
                    "reads its rows through foreign server {} ({}); logical replication does not carry them: \
                     pgshift copies the table's definition and the rows stay where that server keeps them",
                    foreign.server, foreign.wrapper
                ),
                fix: "make sure the target reaches the same rows: the foreign server's address and user mappings, \
                      or for file_fdw the file on the target's host"
                    .into(),
            });
        }
        for view in &db.materialized_views {
            warnings.push(Finding {
                code: "materialized_view",
                object: format!("materialized view {view} (database {})", db.name),
                problem: "contents are not replicated".into(),
                fix: "none needed: pgshift refreshes it on the target before cutover".into(),
            });
        }
    }
    warnings.extend(old_source_warnings(facts));
    warnings.extend(clients::warnings(&facts.clients));
    Report {
        source_version: source.version.clone(),
        target_version: target.version.clone(),
        databases: facts.databases.clone(),
        poolers: facts.clients.poolers.clone(),
        blockers,
        warnings,
        privileges: facts.privileges.clone(),
    }
}

/// The oldest major pgshift upgrades to.
pub const OLDEST_TARGET_MAJOR: i32 = 14;

/// What a source of an old major does differently, with what to do about it. PostgreSQL 10
/// neither sends TRUNCATE (its pgoutput has no such message; 11 added it) nor understands one
/// sent to it: before the cutover a TRUNCATE on the source is silently not replicated, and in
/// the rollback window one on the target stops the back stream's apply on the source.
fn old_source_warnings(facts: &Facts) -> Vec<Finding> {
    let source = &facts.source;
    if source.major() >= 11 {
        return Vec::new();
    }
    let mut warnings = vec![Finding {
        code: "truncate_not_replicated",
        object: "source server".into(),
        problem: format!(
            "runs PostgreSQL {}, which does not replicate TRUNCATE: a table truncated on the source before \
             the cutover keeps its rows on the target",
            source.version
        ),
        fix: "empty tables with DELETE until the cutover (DELETE is replicated); after a TRUNCATE on the source, \
              run the same TRUNCATE on the target before the cutover (SET default_transaction_read_only = off \
              first: pgshift keeps the target read-only)"
            .into(),
    }];
    if facts.rollback_window {
        warnings.push(Finding {
            code: "window_truncate",
            object: "source server".into(),
            problem: format!(
                "runs PostgreSQL {}, which cannot apply a TRUNCATE it receives: a TRUNCATE on the target during \
                 the rollback window stops the back stream, and the source no longer follows the target",
                source.version
            ),
            fix: "empty tables with DELETE on the target until `pgshift cleanup` ends the window, or switch without \
                  a rollback window (--no-rollback-window)"
                .into(),
        });
    }
    warnings
}

/// What the rollback window needs: the target publishes (a logical slot and a WAL sender per
/// database), the source subscribes (an apply worker per database). Each fix offers the way
/// without a window too.
fn window_blockers(facts: &Facts, block: &mut impl FnMut(&'static str, String, String, String)) {
    let (source, target) = (&facts.source, &facts.target);
    let databases = facts.databases.len() as i64;
    let without = "or run without a rollback window (--no-rollback-window)";
    if target.wal_level != "logical" {
        block(
            "window_wal_level",
            "target server".into(),
            format!(
                "has wal_level = {}; the rollback window replicates the target back to the source, which needs logical",
                target.wal_level
            ),
            format!("run ALTER SYSTEM SET wal_level = logical on the target and restart it, {without}"),
        );
    }
    if !facts.resuming && target.max_replication_slots - target.slots_in_use < databases {
        block(
            "window_replication_slots",
            "target server".into(),
            format!(
                "has {} of max_replication_slots = {} in use; the rollback window needs {databases} free",
                target.slots_in_use, target.max_replication_slots
            ),
            format!(
                "raise max_replication_slots on the target to at least {} and restart it, {without}",
                target.slots_in_use + databases
            ),
        );
    }
    if !facts.resuming && target.max_wal_senders - target.senders_in_use < databases {
        block(
            "window_wal_senders",
            "target server".into(),
            format!(
                "has {} of max_wal_senders = {} in use; the rollback window needs {databases} free",
                target.senders_in_use, target.max_wal_senders
            ),
            format!(
                "raise max_wal_senders on the target to at least {} and restart it, {without}",
                target.senders_in_use + databases
            ),
        );
    }
    let taken = source.logical_workers_taken;
    if source.max_logical_replication_workers - taken < databases {
        block(
            "window_logical_workers",
            "source server".into(),
            format!(
                "has max_logical_replication_workers = {}{}; the rollback window needs an apply worker for each of \
                 {databases} database(s) on the source",
                source.max_logical_replication_workers,
                match taken {
                    0 => String::new(),
                    n => format!(" with {n} taken by other subscriptions"),
                }
            ),
            format!(
                "raise max_logical_replication_workers (and max_worker_processes) on the source to at least {} and \
                 restart it, {without}",
                taken + databases
            ),
        );
    }
}

/// Reads every fact preflight judges, from both servers and the local tools; changes nothing.
pub(crate) async fn gather(up: &Upgrade) -> Result<Facts> {
    let source = server_facts(&up.source_admin, Side::Source).await?;
    let target = server_facts(&up.target_admin, Side::Target).await?;
    let target_identity = target_identity(up, &source, &target).await?;
    let available_on_target = available_extensions(&up.target_admin).await?;
    let local_tools = if up.plan.schema_tools_in_target_image {
        None
    } else {
        Tools::locate(up.plan.pg_bin_dir.as_deref())
    };
    let tools = match local_tools {
        None if up.plan.schema_tools_in_target_image => ToolFacts {
            pg_dump: Some(target.version.clone()),
            pg_dump_major: Some(target.major()),
            psql_found: true,
        },
        Some(tools) => {
            let version = tools.pg_dump_version().await.ok();
            ToolFacts {
                pg_dump: version.as_ref().map(|(v, _)| v.clone()),
                pg_dump_major: version.map(|(_, m)| m),
                psql_found: tools.psql.is_file(),
            }
        }
        None => ToolFacts {
            pg_dump: None,
            pg_dump_major: None,
            psql_found: false,
        },
    };
    let mut databases = Vec::new();
    let mut resuming = false;
    for name in up.databases.clone() {
        let exists: bool = up
            .source_admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[&name],
            )
            .await
            .on(Side::Source, "looking for the database")?
            .get(0);
        if !exists {
            databases.push(DatabaseFacts {
                name,
                exists_on_source: false,
                ..Default::default()
            });
            continue;
        }
        let source_db = up.plan.source.with_dbname(&name).connect().await?;
        let target_db = match up.target_database_exists(&name).await? {
            true => Some(up.plan.target.with_dbname(&name).connect().await?),
            false => None,
        };
        if let Some(target_db) = &target_db {
            resuming |= !crate::observe::steps(target_db).await?.is_empty()
                || crate::observe::switch_record(target_db).await?.is_some();
        }
        let mut facts = database_facts(&name, &source_db, target_db.as_ref()).await?;
        // Server-wide on the target, so known before pgshift creates the database there.
        facts.extensions_missing_on_target = installed_extensions(&source_db)
            .await?
            .into_iter()
            .filter(|e| !available_on_target.contains(e))
            .collect();
        let on_target = tablespaces(&up.target_admin).await?;
        facts.tablespaces_missing_on_target = tablespaces_used(&source_db)
            .await?
            .into_iter()
            .filter(|t| !on_target.contains(t))
            .collect();
        databases.push(facts);
    }
    let clients = clients::gather(up, &source).await?;
    Ok(Facts {
        source,
        target,
        tools,
        databases,
        resuming,
        target_identity,
        rollback_window: up.plan.rollback_window,
        clients,
        privileges: crate::privilege::gather(up).await?,
    })
}

/// Whether the target URL reaches the source server (or a physical copy of it). System
/// identifiers need a superuser; the proof that needs no privilege is a session: a random
/// application_name on pgshift's source session, looked for among the target's sessions.
async fn target_identity(
    up: &Upgrade,
    source: &ServerFacts,
    target: &ServerFacts,
) -> Result<TargetIdentity> {
    let token = format!("pgshift-preflight-{:016x}", rand::random::<u64>());
    up.source_admin
        .batch_execute(&format!("SET application_name = {}", sql::literal(&token)))
        .await
        .on(Side::Source, "marking pgshift's session")?;
    let seen = up
        .target_admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1)",
            &[&token],
        )
        .await
        .on(Side::Target, "looking for pgshift's source session");
    up.source_admin
        .batch_execute("RESET application_name")
        .await
        .on(Side::Source, "unmarking pgshift's session")?;
    if seen?.get(0) {
        return Ok(TargetIdentity::SourceItself);
    }
    let known = !source.system_identifier.is_empty();
    Ok(
        if known && source.system_identifier == target.system_identifier {
            TargetIdentity::CopyOfSource
        } else {
            TargetIdentity::Distinct
        },
    )
}

/// Reads the server-wide facts of one side.
pub async fn server_facts(client: &Client, side: Side) -> Result<ServerFacts> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int,
                    current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('wal_level'),
                    current_setting('max_replication_slots')::int8,
                    (SELECT count(*) FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int8,
                    (SELECT count(*) FROM pg_stat_replication),
                    current_setting('max_logical_replication_workers')::int8,
                    current_setting('max_worker_processes')::int8,
                    current_setting('max_sync_workers_per_subscription')::int8,
                    -- Per other subscription: its apply worker while enabled, or the workers it runs.
                    -- (By name: before PostgreSQL 15 a plain role may not read pg_subscription.oid.)
                    (SELECT coalesce(sum(GREATEST(s.subenabled::int,
                                (SELECT count(*) FROM pg_stat_subscription w WHERE w.subname = s.subname AND w.pid IS NOT NULL))), 0)::int8
                     FROM pg_subscription s WHERE s.subname NOT LIKE $1)",
            &[&format!("{}%", names::PREFIX.replace('_', "\\_"))],
        )
        .await
        .on(side, "reading server settings")?;
    Ok(ServerFacts {
        version: row
            .get::<_, String>(0)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
        version_num: row.get(1),
        user: row.get(2),
        superuser: row.get::<_, Option<bool>>(3).unwrap_or(false),
        statement_logging: crate::session::loud_settings(client, side).await?,
        wal_level: row.get(4),
        max_replication_slots: row.get(5),
        slots_in_use: row.get(6),
        max_wal_senders: row.get(7),
        senders_in_use: row.get(8),
        max_logical_replication_workers: row.get(9),
        max_worker_processes: row.get(10),
        max_sync_workers_per_subscription: row.get(11),
        logical_workers_taken: row.get(12),
        // pg_control_system() is for superusers only; the privilege check reports the rest.
        system_identifier: client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or_default(),
    })
}

/// Reads the per-database facts on the source, and the tables the target database (when it
/// exists) already holds.
pub async fn database_facts(
    name: &str,
    source: &Client,
    target: Option<&Client>,
) -> Result<DatabaseFacts> {
    let side = Side::Source;
    let user_tables = "c.relnamespace NOT IN (SELECT oid FROM pg_namespace WHERE nspname IN ('pg_catalog', 'information_schema', 'pg_toast') OR nspname LIKE 'pg\\_temp\\_%' OR nspname = $1)";
    let meta = &names::META_SCHEMA;
    let list = |sql: String| async move {
        let rows = source
            .query(&sql, &[meta])
            .await
            .on(side, "reading tables")?;
        Ok::<_, crate::error::Error>(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
        )
    };
    let totals = source
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8,
                        (SELECT count(*) FROM pg_sequences WHERE schemaname <> $1),
                        (SELECT count(*) FROM pg_largeobject_metadata)
                 FROM pg_class c WHERE c.relkind IN ('r', 'p') AND {user_tables}"
            ),
            &[meta],
        )
        .await
        .on(side, "counting tables")?;
    let tables_without_identity = list(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {user_tables}
           AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS
                (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
         ORDER BY 1"
    ))
    .await?;
    let unlogged_tables = list(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND {user_tables} ORDER BY 1"
    ))
    .await?;
    let materialized_views = list(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'm' AND {user_tables} ORDER BY 1"
    ))
    .await?;
    let mut foreign_tables_on_target = Vec::new();
    if let Some(target) = target {
        foreign_tables_on_target = foreign_tables(target).await?;
    }
    let fdw_tables = source
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), s.srvname::text, w.fdwname::text
                 FROM pg_foreign_table f JOIN pg_class c ON c.oid = f.ftrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_foreign_server s ON s.oid = f.ftserver
                 JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
                 WHERE {user_tables} ORDER BY 1"
            ),
            &[meta],
        )
        .await
        .on(side, "listing foreign tables")?
        .iter()
        .map(|r| FdwTable {
            table: r.get(0),
            server: r.get(1),
            wrapper: r.get(2),
        })
        .collect();
    Ok(DatabaseFacts {
        name: name.to_string(),
        exists_on_source: true,
        tables: totals.get(0),
        bytes: totals.get(1),
        sequences: totals.get(2),
        large_objects: totals.get(3),
        tables_without_identity,
        unlogged_tables,
        materialized_views,
        foreign_tables_on_target,
        fdw_tables,
        // Server-wide on the target: the caller fills them in.
        extensions_missing_on_target: Vec::new(),
        tablespaces_missing_on_target: Vec::new(),
    })
}

/// The tablespaces a database uses besides the defaults: its own default, and those of its
/// tables, indexes and materialized views.
pub async fn tablespaces_used(source: &Client) -> Result<Vec<String>> {
    names_from(
        source,
        Side::Source,
        "listing tablespaces in use",
        "SELECT DISTINCT t.spcname::text FROM pg_tablespace t
         WHERE t.spcname NOT IN ('pg_default', 'pg_global')
           AND (t.oid IN (SELECT reltablespace FROM pg_class WHERE relkind IN ('r', 'p', 'i', 'I', 'm'))
                OR t.oid = (SELECT dattablespace FROM pg_database WHERE datname = current_database()))
         ORDER BY 1",
    )
    .await
}

/// The extensions installed in a source database that pgshift's schema copy creates.
pub async fn installed_extensions(source: &Client) -> Result<Vec<String>> {
    names_from(
        source,
        Side::Source,
        "listing extensions",
        "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
    )
    .await
}

/// The extensions a server can install (server-wide: any database, the maintenance one too).
pub async fn available_extensions(server: &Client) -> Result<Vec<String>> {
    names_from(
        server,
        Side::Target,
        "listing available extensions",
        "SELECT name::text FROM pg_available_extensions",
    )
    .await
}

/// The tablespaces a server has.
pub async fn tablespaces(server: &Client) -> Result<Vec<String>> {
    names_from(
        server,
        Side::Target,
        "listing tablespaces",
        "SELECT spcname::text FROM pg_tablespace",
    )
    .await
}

/// The first column of a query's rows.
async fn names_from(
    client: &Client,
    side: Side,
    context: &str,
    query: &str,
) -> Result<Vec<String>> {
    Ok(client
        .query(query, &[])
        .await
        .on(side, context)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// User tables in a target database that pgshift's schema copy did not create. A target whose
/// schema step is recorded as done, or that pgshift switched to, holds only what pgshift restored.
pub async fn foreign_tables(target: &Client) -> Result<Vec<String>> {
    if crate::observe::steps(target)
        .await?
        .iter()
        .any(|s| s == names::step::SCHEMA)
        || crate::observe::switch_record(target).await?.is_some()
    {
        return Ok(Vec::new());
    }
    Ok(target
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', $1)
             ORDER BY 1 LIMIT 20",
            &[&names::META_SCHEMA],
        )
        .await
        .on(Side::Target, "looking for existing tables")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Human-readable report, the same text `pgshift check` prints.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "source PostgreSQL {} -> target PostgreSQL {}\n",
        report.source_version, report.target_version
    );
    for db in &report.databases {
        out.push_str(&format!(
            "  database {}: {} tables, {:.1} MB, {} sequences\n",
            db.name,
            db.tables,
            db.bytes as f64 / 1e6,
            db.sequences
        ));
    }
    for pooler in &report.poolers {
        out.push_str(&format!(
            "  PgBouncer {}: version {}, pool_mode {}, max_prepared_statements {}\n",
            pooler.console,
            pooler.version,
            pooler.pool_mode,
            pooler
                .max_prepared_statements
                .map_or("(none before 1.21)".to_string(), |n| n.to_string())
        ));
    }
    for (title, findings) in [
        ("blockers", &report.blockers),
        ("warnings", &report.warnings),
    ] {
        if findings.is_empty() {
            continue;
        }
        out.push_str(&format!("{title}:\n"));
        for f in findings {
            out.push_str(&format!(
                "  - {} {}\n    fix: {}\n",
                f.object, f.problem, f.fix
            ));
        }
    }
    out.push_str(if report.ready() {
        "ready: no blockers\n"
    } else {
        "not ready: fix the blockers above; nothing was changed\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superuser(major: i32) -> crate::privilege::RoleFacts {
        crate::privilege::RoleFacts {
            user: "postgres".into(),
            major,
            superuser: true,
            replication: true,
            create_subscription: major >= 16,
            create_db: true,
            create_role: true,
            reads_pg_authid: true,
            ..Default::default()
        }
    }

    fn server(version_num: i32) -> ServerFacts {
        ServerFacts {
            version: format!("{}.1", version_num / 10000),
            version_num,
            user: "postgres".into(),
            superuser: true,
            statement_logging: Vec::new(),
            wal_level: "logical".into(),
            max_replication_slots: 10,
            slots_in_use: 0,
            max_wal_senders: 10,
            senders_in_use: 0,
            max_logical_replication_workers: 4,
            max_worker_processes: 8,
            max_sync_workers_per_subscription: 2,
            logical_workers_taken: 0,
            system_identifier: format!("{version_num}"),
        }
    }

    fn facts() -> Facts {
        Facts {
            source: server(150004),
            target: server(180001),
            tools: ToolFacts {
                pg_dump: Some("18.1".into()),
                pg_dump_major: Some(18),
                psql_found: true,
            },
            databases: vec![DatabaseFacts {
                name: "app".into(),
                exists_on_source: true,
                ..Default::default()
            }],
            resuming: false,
            target_identity: TargetIdentity::Distinct,
            rollback_window: true,
            clients: Default::default(),
            privileges: crate::privilege::Privileges {
                source: superuser(15),
                target: superuser(18),
                databases: Vec::new(),
                passwords_to_set: Vec::new(),
            },
        }
    }

    fn codes(report: &Report) -> Vec<&'static str> {
        report.blockers.iter().map(|f| f.code).collect()
    }

    #[test]
    fn clean_facts_are_ready() {
        let report = evaluate(&facts());
        assert!(report.ready(), "{:?}", report.blockers);
    }

    #[test]
    fn wal_level_replica_blocks_with_fix() {
        let mut f = facts();
        f.source.wal_level = "replica".into();
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["wal_level"]);
        assert!(report.blockers[0].fix.contains("wal_level = logical"));
    }

    #[test]
    fn a_tablespace_the_target_lacks_blocks_with_its_name_quoted_in_the_fix() {
        let mut f = facts();
        f.databases[0].tablespaces_missing_on_target = vec!["Archive".into()];
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["tablespace_missing"]);
        assert_eq!(
            report.blockers[0].object,
            "tablespace Archive (database app)"
        );
        assert!(report.blockers[0]
            .fix
            .contains("CREATE TABLESPACE \"Archive\" LOCATION"));
    }

    #[test]
    fn older_target_blocks() {
        let mut f = facts();
        f.target = server(140010);
        f.tools.pg_dump_major = Some(14);
        assert!(codes(&evaluate(&f)).contains(&"target_older"));
    }

    #[test]
    fn keyless_table_names_the_table_and_the_fix() {
        let mut f = facts();
        f.databases[0].tables_without_identity = vec!["public.events".into()];
        let report = evaluate(&f);
        assert_eq!(
            report.blockers[0].to_string(),
            "table public.events (database app) has no primary key or replica identity; its UPDATEs and \
             DELETEs cannot be replicated: ALTER TABLE public.events REPLICA IDENTITY FULL, or add a primary key"
        );
    }

    #[test]
    fn wrong_or_missing_pg_dump_blocks() {
        let mut f = facts();
        f.tools.pg_dump_major = Some(15);
        assert_eq!(codes(&evaluate(&f)), ["pg_dump_version"]);
        f.tools.pg_dump_major = None;
        assert_eq!(codes(&evaluate(&f)), ["pg_dump_missing"]);
    }

    #[test]
    fn non_superuser_blocks_and_slots_are_counted() {
        let mut f = facts();
        f.privileges.source.superuser = false;
        f.source.slots_in_use = 9;
        assert_eq!(
            codes(&evaluate(&f)),
            ["window_source_superuser", "replication_slots"]
        );
        f.resuming = true;
        assert_eq!(codes(&evaluate(&f)), ["window_source_superuser"]);
    }

    #[test]
    fn the_rollback_window_needs_a_logical_target_and_workers_on_the_source() {
        let mut f = facts();
        f.target.wal_level = "replica".into();
        f.target.slots_in_use = 10;
        f.source.max_logical_replication_workers = 0;
        let report = evaluate(&f);
        assert_eq!(
            codes(&report),
            [
                "window_wal_level",
                "window_replication_slots",
                "window_logical_workers"
            ]
        );
        assert!(report
            .blockers
            .iter()
            .all(|b| b.fix.contains("--no-rollback-window")));
        f.rollback_window = false;
        assert!(evaluate(&f).ready(), "{:?}", evaluate(&f).blockers);
    }

    #[test]
    fn a_target_role_that_cannot_silence_the_statement_log_blocks() {
        let mut f = facts();
        f.rollback_window = false;
        f.source.statement_logging = vec!["log_statement".into()];
        assert!(
            evaluate(&f).ready(),
            "without a rollback window the source gets no secrets in statements"
        );
        f.rollback_window = true;
        assert_eq!(codes(&evaluate(&f)), ["statement_logging"]);
        f.source.statement_logging.clear();
        f.target.statement_logging = vec!["log_statement".into(), "log_min_error_statement".into()];
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["statement_logging"]);
        assert!(report.blockers[0].fix.contains(
            "GRANT SET ON PARAMETER log_statement, log_min_error_statement TO \"postgres\""
        ));
    }

    #[test]
    fn a_postgresql_10_source_warns_that_truncate_is_not_replicated_either_way() {
        let mut f = facts();
        f.source = server(100023);
        let report = evaluate(&f);
        assert!(report.ready(), "{:?}", report.blockers);
        let warnings: Vec<&str> = report.warnings.iter().map(|w| w.code).collect();
        assert_eq!(warnings, ["truncate_not_replicated", "window_truncate"]);
        assert!(report.warnings[0]
            .problem
            .starts_with("runs PostgreSQL 10.1, which does not replicate TRUNCATE"));
        assert!(report.warnings[0]
            .fix
            .contains("run the same TRUNCATE on the target"));
        assert!(report.warnings[1].fix.contains("--no-rollback-window"));
        f.rollback_window = false;
        let warnings: Vec<&str> = evaluate(&f).warnings.iter().map(|w| w.code).collect();
        assert_eq!(warnings, ["truncate_not_replicated"]);
        for newer in [110022, 120022, 130023] {
            f.source = server(newer);
            assert!(evaluate(&f).warnings.is_empty(), "PostgreSQL {newer}");
        }
    }

    #[test]
    fn a_target_older_than_14_blocks() {
        let mut f = facts();
        f.source = server(100023);
        f.target = server(130023);
        f.tools.pg_dump_major = Some(13);
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["target_unsupported"]);
        assert_eq!(
            report.blockers[0].fix,
            "point --target at a server of PostgreSQL 14 or newer"
        );
        f.target = server(140020);
        f.tools.pg_dump_major = Some(14);
        assert!(evaluate(&f).ready(), "{:?}", evaluate(&f).blockers);
    }

    #[test]
    fn unlogged_and_matviews_warn_only() {
        let mut f = facts();
        f.databases[0].unlogged_tables = vec!["public.cache".into()];
        f.databases[0].materialized_views = vec!["public.totals".into()];
        let report = evaluate(&f);
        assert!(report.ready());
        assert_eq!(report.warnings.len(), 2);
    }

    #[test]
    fn a_target_that_is_the_source_is_the_only_blocker() {
        let mut f = facts();
        f.databases[0].foreign_tables_on_target = vec!["public.items".into()];
        f.target_identity = TargetIdentity::SourceItself;
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["target_is_source"]);
        assert!(report.blockers[0]
            .fix
            .contains("point --target at the new server"));
    }

    #[test]
    fn a_physical_copy_of_the_source_blocks_naming_the_identifier() {
        let mut f = facts();
        f.target.system_identifier = f.source.system_identifier.clone();
        f.target_identity = TargetIdentity::CopyOfSource;
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["target_copy_of_source"]);
        assert!(report.blockers[0].problem.contains("150004"));
    }

    #[test]
    fn too_few_replication_workers_block_with_the_numbers() {
        let mut f = facts();
        f.databases.push(DatabaseFacts {
            name: "billing".into(),
            exists_on_source: true,
            ..Default::default()
        });
        f.target.max_logical_replication_workers = 4;
        f.target.logical_workers_taken = 2;
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["logical_workers"]);
        assert_eq!(
            report.blockers[0].to_string(),
            "target server has max_logical_replication_workers = 4 with 2 taken by other subscriptions; \
             pgshift needs 3 (an apply worker for each of 2 database(s) and at least one table-sync worker): \
             raise max_logical_replication_workers on the target to at least 5 and restart it"
        );
        f.target.max_logical_replication_workers = 5;
        let report = evaluate(&f);
        assert!(report.ready(), "{:?}", report.blockers);
        assert_eq!(report.warnings[0].code, "logical_workers");
    }

    #[test]
    fn too_few_worker_processes_or_no_sync_workers_block() {
        let mut f = facts();
        f.target.max_worker_processes = 2;
        f.target.max_sync_workers_per_subscription = 0;
        let report = evaluate(&f);
        assert_eq!(codes(&report), ["worker_processes", "sync_workers"]);
        assert!(report.blockers[0]
            .fix
            .contains("raise max_worker_processes on the target to at least 3"));
    }

    #[test]
    fn each_foreign_table_warns_that_its_rows_stay_behind() {
        let mut f = facts();
        f.databases[0].fdw_tables = vec![FdwTable {
            table: "public.regions".into(),
            server: "files".into(),
            wrapper: "file_fdw".into(),
        }];
        let report = evaluate(&f);
        assert!(report.ready());
        assert_eq!(report.warnings[0].code, "foreign_table");
        assert!(report.warnings[0]
            .problem
            .contains("foreign server files (file_fdw)"));
    }
}
