//! What is there now: pgshift's objects and the replication's state, read from both servers.
//! Every decision is made from this, never from remembered state, so a crashed run resumes.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Result, Side, SqlContext};
use crate::names::{self, step};
use crate::sql;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub active: bool,
    /// Source WAL not yet confirmed by the subscriber.
    pub lag_bytes: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub oid: u32,
    pub enabled: bool,
    pub tables_total: i64,
    pub tables_ready: i64,
    /// Tables whose initial copy is running now.
    pub tables_copying: i64,
    /// Bytes the running COPYs have processed (pg_stat_progress_copy).
    pub bytes_copied: i64,
    /// Errors counted by pg_stat_subscription_stats (PostgreSQL 15+), apply and table sync.
    pub errors: i64,
    pub worker_running: bool,
}

/// One database's state on both servers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Database {
    pub name: String,
    pub source_oid: u32,
    pub source_bytes: i64,
    pub target_exists: bool,
    /// Steps recorded in the target's state table.
    pub steps: Vec<String>,
    pub source_meta: bool,
    pub source_read_only: bool,
    pub target_read_only: bool,
    pub publication: bool,
    pub slot: Option<Slot>,
    pub subscription: Option<Subscription>,
}

impl Database {
    pub fn has(&self, step: &str) -> bool {
        self.steps.iter().any(|s| s == step)
    }
    pub fn subscription_name(&self) -> String {
        names::subscription(self.source_oid)
    }
}

/// The next thing to do for one database (pure: see `decide`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CreateDatabase,
    CopySchema,
    ProtectTarget,
    CreateSourceMeta,
    CreatePublication,
    CreateSlot,
    CreateSubscription,
    /// The subscription exists but its slot on the source is gone: it can never catch up.
    Broken(String),
    WaitForCopy,
    Analyze,
    /// In sync, ready for cutover.
    Synced,
    Switched,
}

/// Decides what a database needs next, from its observed state alone.
pub fn decide(db: &Database) -> Action {
    if db.has(step::SWITCHED) {
        return Action::Switched;
    }
    if !db.target_exists {
        return Action::CreateDatabase;
    }
    if !db.has(step::SCHEMA) {
        return Action::CopySchema;
    }
    if !db.target_read_only {
        return Action::ProtectTarget;
    }
    if !db.source_meta {
        return Action::CreateSourceMeta;
    }
    if !db.publication {
        return Action::CreatePublication;
    }
    match (&db.slot, &db.subscription) {
        (None, None) => Action::CreateSlot,
        (Some(_), None) => Action::CreateSubscription,
        (None, Some(_)) => Action::Broken(format!(
            "subscription {} exists on the target but its replication slot is missing on the source; \
             run `pgshift abort` and start again",
            db.subscription_name()
        )),
        (Some(_), Some(sub)) if sub.tables_total == 0 || sub.tables_ready < sub.tables_total => Action::WaitForCopy,
        (Some(_), Some(_)) if !db.has(step::ANALYZED) => Action::Analyze,
        _ => Action::Synced,
    }
}

/// Reads one database's state. `target` is None when the database is missing on the target.
pub async fn database(
    name: &str,
    source_admin: &Client,
    source: &Client,
    target_admin: &Client,
    target: Option<&Client>,
) -> Result<Database> {
    let row = source_admin
        .query_one(
            "SELECT d.oid, pg_database_size(d.oid),
                    EXISTS (SELECT 1 FROM pg_db_role_setting s WHERE s.setdatabase = d.oid AND s.setrole = 0
                            AND 'default_transaction_read_only=on' = ANY (s.setconfig))
             FROM pg_database d WHERE d.datname = $1",
            &[&name],
        )
        .await
        .on(Side::Source, "reading the database")?;
    let source_oid: u32 = row.get(0);
    let slot_name = names::subscription(source_oid);
    let slot = source_admin
        .query_opt(
            "SELECT active, (pg_current_wal_lsn() - coalesce(confirmed_flush_lsn, '0/0'))::int8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot_name],
        )
        .await
        .on(Side::Source, "reading the replication slot")?
        .map(|r| Slot {
            active: r.get(0),
            lag_bytes: r.get(1),
        });
    let source_objects = source
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $3)",
            &[
                &names::META_SCHEMA,
                &names::MARKER_TABLE,
                &names::PUBLICATION,
            ],
        )
        .await
        .on(Side::Source, "looking for pgshift objects")?;
    let target_read_only: bool = target_admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
                            WHERE d.datname = $1 AND s.setrole = 0
                            AND 'default_transaction_read_only=on' = ANY (s.setconfig))",
            &[&name],
        )
        .await
        .on(Side::Target, "reading database settings")?
        .get(0);
    let mut db = Database {
        name: name.to_string(),
        source_oid,
        source_bytes: row.get(1),
        target_exists: target.is_some(),
        source_read_only: row.get(2),
        target_read_only,
        source_meta: source_objects.get(0),
        publication: source_objects.get(1),
        slot,
        ..Default::default()
    };
    if let Some(target) = target {
        db.steps = steps(target).await?;
        db.subscription = subscription(target, &slot_name).await?;
    }
    Ok(db)
}

/// The steps recorded in a target database's state table (none if the table is missing).
pub async fn steps(target: &Client) -> Result<Vec<String>> {
    let exists: bool = target
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
            &[&names::META_SCHEMA, &names::STATE_TABLE],
        )
        .await
        .on(Side::Target, "looking for pgshift state")?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    Ok(target
        .query(
            &format!(
                "SELECT step FROM {} ORDER BY done_at",
                sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
            ),
            &[],
        )
        .await
        .on(Side::Target, "reading pgshift state")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn subscription(target: &Client, name: &str) -> Result<Option<Subscription>> {
    let Some(row) = target
        .query_opt(
            "SELECT s.oid, s.subenabled,
                    (SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid),
                    (SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid AND r.srsubstate IN ('r', 's')),
                    (SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid AND r.srsubstate = 'd'),
                    EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.pid IS NOT NULL AND w.relid IS NULL)
             FROM pg_subscription s WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await
        .on(Side::Target, "reading the subscription")?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let bytes_copied: i64 = target
        .query_one(
            "SELECT coalesce(sum(bytes_processed), 0)::int8 FROM pg_stat_progress_copy WHERE datname = current_database()",
            &[],
        )
        .await
        .on(Side::Target, "reading copy progress")?
        .get(0);
    let errors = subscription_errors(target, oid).await?;
    Ok(Some(Subscription {
        oid,
        enabled: row.get(1),
        tables_total: row.get(2),
        tables_ready: row.get(3),
        tables_copying: row.get(4),
        bytes_copied,
        errors,
        worker_running: row.get(5),
    }))
}

/// Apply and table-sync errors the target counted for a subscription (PostgreSQL 15+; 0 before).
async fn subscription_errors(target: &Client, oid: u32) -> Result<i64> {
    let has_stats: bool = target
        .query_one(
            "SELECT to_regclass('pg_catalog.pg_stat_subscription_stats') IS NOT NULL",
            &[],
        )
        .await
        .on(Side::Target, "checking statistics views")?
        .get(0);
    if !has_stats {
        return Ok(0);
    }
    Ok(target
        .query_one(
            "SELECT coalesce(sum(apply_error_count + sync_error_count), 0)::int8 FROM pg_stat_subscription_stats WHERE subid = $1",
            &[&oid],
        )
        .await
        .on(Side::Target, "reading subscription errors")?
        .get(0))
}

/// Why apply is failing, as the target reports it: the last replication errors in its log
/// (when the log is readable over SQL), and tables or columns the target lacks.
pub async fn apply_failure_cause(source: &Client, target: &Client) -> Result<String> {
    let mut causes = schema_drift(source, target).await?;
    if let Some(line) = newest_log_entry(target, &["ERROR"]).await {
        causes.push(line);
    }
    if causes.is_empty() {
        causes.push("the target counts replication errors; its server log has the details".into());
    }
    Ok(causes.join("; "))
}

/// Columns and tables of the source that the target lacks: what DDL on the source during the
/// upgrade leaves behind.
pub async fn schema_drift(source: &Client, target: &Client) -> Result<Vec<String>> {
    let query = "SELECT format('%I.%I', n.nspname, c.relname), a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                   AND n.nspname NOT LIKE 'pg\\_temp\\_%'";
    let on_source = columns(source, Side::Source, query).await?;
    let on_target = columns(target, Side::Target, query).await?;
    let mut drift = Vec::new();
    for (table, column, kind) in &on_source {
        if !on_target.iter().any(|(t, _, _)| t == table) {
            if !drift
                .iter()
                .any(|d: &String| d.contains(&format!("table {table} ")))
            {
                drift.push(format!(
                    "table {table} exists on the source but not on the target (created during the upgrade?): \
                     create it on the target with the same definition, then run ALTER SUBSCRIPTION ... REFRESH PUBLICATION"
                ));
            }
        } else if !on_target.iter().any(|(t, c, _)| t == table && c == column) {
            drift.push(format!(
                "column {table}.{column} exists on the source but not on the target (DDL during the upgrade?): \
                 on the target, run SET default_transaction_read_only = off; ALTER TABLE {table} ADD COLUMN {} {kind} \
                 (pgshift keeps the target read-only until the cutover)",
                sql::ident(column)
            ));
        }
    }
    Ok(drift)
}

async fn columns(
    client: &Client,
    side: Side,
    query: &str,
) -> Result<Vec<(String, String, String)>> {
    Ok(client
        .query(query, &[])
        .await
        .on(side, "comparing table definitions")?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// The newest line of one of `levels` (e.g. `ERROR`) in the target's current log file, with
/// the DETAIL, HINT or CONTEXT line after it, if the log collector writes one that the
/// connected (superuser) role can read.
pub(crate) async fn newest_log_entry(target: &Client, levels: &[&str]) -> Option<String> {
    let row = target
        .query_one(
            "SELECT f, (pg_stat_file(f)).size FROM (SELECT pg_current_logfile() AS f) s WHERE f IS NOT NULL",
            &[],
        )
        .await
        .ok()?;
    let (file, size): (String, i64) = (row.get(0), row.get(1));
    let offset = (size - 65536).max(0);
    let text: String = target
        .query_one("SELECT pg_read_file($1, $2, 65536)", &[&file, &offset])
        .await
        .ok()?
        .get(0);
    let lines: Vec<&str> = text.lines().collect();
    let level_of = |line: &str| {
        levels.iter().find_map(|level| {
            let (_, message) = line.split_once(&format!("{level}:"))?;
            Some((*level, message.trim().to_string()))
        })
    };
    let position = lines
        .iter()
        .rposition(|l| !l.contains("STATEMENT:") && level_of(l).is_some())?;
    let (level, message) = level_of(lines[position])?;
    // The line usually comes with the "logical replication ... worker" context or a hint.
    let context = lines
        .get(position + 1)
        .filter(|l| {
            ["CONTEXT:", "DETAIL:", "HINT:"]
                .iter()
                .any(|c| l.contains(c))
        })
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    Some(
        format!("target log: {level}: {message} {context}")
            .trim()
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> Database {
        Database {
            name: "app".into(),
            source_oid: 16384,
            target_exists: true,
            steps: vec![step::SCHEMA.into(), step::ANALYZED.into()],
            source_meta: true,
            target_read_only: true,
            publication: true,
            slot: Some(Slot {
                active: true,
                lag_bytes: 0,
            }),
            subscription: Some(Subscription {
                tables_total: 3,
                tables_ready: 3,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_fresh_database_starts_with_creating_it() {
        assert_eq!(decide(&Database::default()), Action::CreateDatabase);
    }

    #[test]
    fn steps_follow_in_order() {
        let mut db = synced();
        assert_eq!(decide(&db), Action::Synced);
        db.steps.retain(|s| s != step::ANALYZED);
        assert_eq!(decide(&db), Action::Analyze);
        db.subscription.as_mut().unwrap().tables_ready = 2;
        assert_eq!(decide(&db), Action::WaitForCopy);
        db.subscription = None;
        assert_eq!(decide(&db), Action::CreateSubscription);
        db.slot = None;
        assert_eq!(decide(&db), Action::CreateSlot);
        db.publication = false;
        assert_eq!(decide(&db), Action::CreatePublication);
        db.source_meta = false;
        assert_eq!(decide(&db), Action::CreateSourceMeta);
        db.target_read_only = false;
        assert_eq!(decide(&db), Action::ProtectTarget);
        db.steps.clear();
        assert_eq!(decide(&db), Action::CopySchema);
    }

    #[test]
    fn a_subscription_without_its_slot_is_broken() {
        let mut db = synced();
        db.slot = None;
        assert!(matches!(decide(&db), Action::Broken(_)));
    }

    #[test]
    fn switched_wins_over_everything() {
        let mut db = synced();
        db.steps.push(step::SWITCHED.into());
        db.target_read_only = false;
        assert_eq!(decide(&db), Action::Switched);
    }
}
