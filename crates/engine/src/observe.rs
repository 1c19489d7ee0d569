//! What is there now: pgshift's objects and the replication's state, read from both servers.
//! Every decision is made from this, never from remembered state, so a crashed run resumes.

use serde::Serialize;
use tokio_postgres::Client;

use crate::decide::Direction;
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

/// One direction's replication objects (see `decide`): publication and slot on the server that
/// publishes, subscription on the one that subscribes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stream {
    pub publication: bool,
    pub slot: Option<Slot>,
    pub subscription: Option<Subscription>,
}

/// A table created on the source during the upgrade that its table-list publication lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NewTable {
    pub schema: String,
    pub name: String,
    /// The target has a table of that name (its definition was copied).
    pub on_target: bool,
}

impl NewTable {
    /// The table's name as SQL writes it.
    pub fn qualified(&self) -> String {
        sql::qualified(&self.schema, &self.name)
    }
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
    /// The schema step restored the table definitions only: the other indexes and
    /// constraints are built after the initial copy.
    pub definitions_only: bool,
    /// When the switch moved this database's clients to the target, from the record that
    /// outlives cleanup (the comment on the target's `pgshift_meta` schema).
    pub switched_at: Option<String>,
    /// The switch is recorded and cleanup has removed pgshift's tables.
    pub cleaned_up: bool,
    pub source_meta: bool,
    pub source_read_only: bool,
    pub target_read_only: bool,
    /// Source to target.
    pub forward: Stream,
    /// Target to source: the rollback window.
    pub back: Stream,
    /// The target LSN the back stream starts from (recorded with the switch).
    pub back_from: Option<String>,
    /// The source LSN the forward stream resumes from after a rollback.
    pub forward_from: Option<String>,
    /// Tables of the source that its table-list publication lacks (created during the
    /// upgrade); always none under `FOR ALL TABLES`.
    pub unpublished: Vec<NewTable>,
    /// Tables the forward table-list publication carries that its subscription has not taken
    /// on yet (their rows are not copied until it is refreshed).
    pub unsubscribed: Vec<String>,
}

impl Database {
    pub fn has(&self, step: &str) -> bool {
        self.steps.iter().any(|s| s == step)
    }
    /// The switch happened: the target has taken writes, nothing but a rollback through the
    /// window may undo the upgrade.
    pub fn switched(&self) -> bool {
        self.switched_at.is_some() || self.has(step::SWITCHED)
    }
    /// The server whose database clients use now.
    pub fn serving(&self) -> Side {
        if self.switched() {
            Side::Target
        } else {
            Side::Source
        }
    }
    pub fn stream(&self, direction: Direction) -> &Stream {
        match direction {
            Direction::Forward => &self.forward,
            Direction::Back => &self.back,
        }
    }
    /// The forward subscription's (and slot's) name.
    pub fn subscription_name(&self) -> String {
        names::subscription(self.source_oid)
    }
    /// The name of a stream's subscription and slot.
    pub fn stream_name(&self, direction: Direction) -> String {
        match direction {
            Direction::Forward => names::subscription(self.source_oid),
            Direction::Back => names::back_subscription(self.source_oid),
        }
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
    let forward_name = names::subscription(source_oid);
    let back_name = names::back_subscription(source_oid);
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
        forward: Stream {
            publication: source_objects.get(1),
            slot: slot(source_admin, Side::Source, &forward_name).await?,
            subscription: None,
        },
        back: Stream {
            publication: false,
            slot: slot(target_admin, Side::Target, &back_name).await?,
            subscription: subscription(source, Side::Source, &back_name).await?,
        },
        ..Default::default()
    };
    if let Some(target) = target {
        let records = records(target).await?;
        let value = |step: &str| {
            records
                .iter()
                .find(|(s, _)| s == step)
                .and_then(|(_, v)| v.clone())
        };
        db.back_from = value(step::BACK_FROM);
        db.definitions_only =
            value(step::SCHEMA).as_deref() == Some(crate::schema::sections::DEFINITIONS_ONLY);
        db.forward_from = value(step::FORWARD_FROM);
        db.steps = records.into_iter().map(|(s, _)| s).collect();
        db.switched_at = switch_record(target).await?;
        db.cleaned_up = db.switched_at.is_some() && !db.has(step::SWITCHED);
        db.forward.subscription = subscription(target, Side::Target, &forward_name).await?;
        db.back.publication = back_publication_exists(target).await?;
    }
    if db.forward.publication && !db.switched() {
        (db.unpublished, db.unsubscribed) =
            table_list_gaps(source, target, db.forward.subscription.as_ref()).await?;
    }
    Ok(db)
}

/// What the source's table-list publication lacks (tables created since it was made) and what
/// the target's subscription has not taken on of it. Nothing under `FOR ALL TABLES`.
async fn table_list_gaps(
    source: &Client,
    target: Option<&Client>,
    subscription: Option<&Subscription>,
) -> Result<(Vec<NewTable>, Vec<String>)> {
    let table_list: bool = source
        .query_opt(
            "SELECT NOT puballtables FROM pg_publication WHERE pubname = $1",
            &[&names::PUBLICATION],
        )
        .await
        .on(Side::Source, "reading the publication")?
        .is_some_and(|r| r.get(0));
    if !table_list {
        return Ok((Vec::new(), Vec::new()));
    }
    let rows = source
        .query(
            &format!(
                "{} AND NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                                    WHERE p.pubname = $3 AND p.schemaname = n.nspname AND p.tablename = c.relname)
                 ORDER BY 1, 2",
                crate::streams::PUBLISHABLE_TABLES
            ),
            &[&names::META_SCHEMA, &names::MARKER_TABLE, &names::PUBLICATION],
        )
        .await
        .on(Side::Source, "looking for tables the publication lacks")?;
    let mut unpublished = Vec::new();
    for row in rows {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let on_target = match target {
            Some(target) => target
                .query_one(
                    "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL",
                    &[&schema, &name],
                )
                .await
                .on(Side::Target, "looking for a new table")?
                .get(0),
            None => false,
        };
        unpublished.push(NewTable {
            schema,
            name,
            on_target,
        });
    }
    let (Some(target), Some(subscription)) = (target, subscription) else {
        return Ok((unpublished, Vec::new()));
    };
    let subscribed: Vec<String> = target
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_subscription_rel r
             JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE r.srsubid = $1",
            &[&subscription.oid],
        )
        .await
        .on(Side::Target, "reading the subscription's tables")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unsubscribed = source
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&names::PUBLICATION],
        )
        .await
        .on(Side::Source, "reading the publication's tables")?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|table| !subscribed.contains(table))
        .collect();
    Ok((unpublished, unsubscribed))
}

/// Whether the target's database has the rollback window's publication.
pub(crate) async fn back_publication_exists(target: &Client) -> Result<bool> {
    Ok(target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&names::BACK_PUBLICATION],
        )
        .await
        .on(Side::Target, "looking for pgshift's publication")?
        .get(0))
}

/// A replication slot of pgshift's on `server`, with how far its consumer is behind.
async fn slot(server: &Client, side: Side, name: &str) -> Result<Option<Slot>> {
    Ok(server
        .query_opt(
            "SELECT active, (pg_current_wal_lsn() - coalesce(confirmed_flush_lsn, '0/0'))::int8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .on(side, "reading the replication slot")?
        .map(|r| Slot {
            active: r.get(0),
            lag_bytes: r.get(1),
        }))
}

/// When the switch happened, from the comment on the target's `pgshift_meta` schema, which
/// cleanup keeps.
pub async fn switch_record(target: &Client) -> Result<Option<String>> {
    let comment: Option<String> = target
        .query_opt(
            "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1",
            &[&names::META_SCHEMA],
        )
        .await
        .on(Side::Target, "reading pgshift's record of the switch")?
        .and_then(|r| r.get(0));
    Ok(comment.as_deref().and_then(sql::parse_switch_record))
}

/// The steps recorded in a target database's state table (none if the table is missing).
pub async fn steps(target: &Client) -> Result<Vec<String>> {
    Ok(records(target).await?.into_iter().map(|(s, _)| s).collect())
}

/// The state table's rows: step and value, in the order they were recorded.
async fn records(target: &Client) -> Result<Vec<(String, Option<String>)>> {
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
                "SELECT step, value FROM {} ORDER BY done_at",
                sql::qualified(names::META_SCHEMA, names::STATE_TABLE)
            ),
            &[],
        )
        .await
        .on(Side::Target, "reading pgshift state")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A subscription of pgshift's in the database `client` is connected to.
async fn subscription(client: &Client, side: Side, name: &str) -> Result<Option<Subscription>> {
    let Some(row) = client
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
        .on(side, "reading the subscription")?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let tables_copying: i64 = row.get(4);
    // Only an initial copy has progress to read (pg_stat_progress_copy is 14+; a back stream's
    // subscriber may be older).
    let bytes_copied: i64 = if tables_copying == 0 {
        0
    } else {
        client
            .query_one(
                "SELECT coalesce(sum(bytes_processed), 0)::int8 FROM pg_stat_progress_copy WHERE datname = current_database()",
                &[],
            )
            .await
            .on(side, "reading copy progress")?
            .get(0)
    };
    let errors = subscription_errors(client, side, oid).await?;
    Ok(Some(Subscription {
        oid,
        enabled: row.get(1),
        tables_total: row.get(2),
        tables_ready: row.get(3),
        tables_copying,
        bytes_copied,
        errors,
        worker_running: row.get(5),
    }))
}

/// Apply and table-sync errors the target counted for a subscription (PostgreSQL 15+; 0 before).
async fn subscription_errors(client: &Client, side: Side, oid: u32) -> Result<i64> {
    let has_stats: bool = client
        .query_one(
            "SELECT to_regclass('pg_catalog.pg_stat_subscription_stats') IS NOT NULL",
            &[],
        )
        .await
        .on(side, "checking statistics views")?
        .get(0);
    if !has_stats {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(sum(apply_error_count + sync_error_count), 0)::int8 FROM pg_stat_subscription_stats WHERE subid = $1",
            &[&oid],
        )
        .await
        .on(side, "reading subscription errors")?
        .get(0))
}

/// Why apply of a stream is failing, as its subscriber reports it: the last replication
/// errors in its log (when the log is readable over SQL), and tables or columns it lacks.
/// `publisher` and `subscriber` are a session in the database on each end.
pub async fn apply_failure_cause(
    publisher: (&Client, Side),
    subscriber: (&Client, Side),
) -> Result<String> {
    let mut causes = schema_drift(publisher, subscriber).await?;
    if let Some(line) = newest_log_entry(subscriber.0, &["ERROR"]).await {
        causes.push(line);
    }
    if causes.is_empty() {
        causes.push(format!(
            "the {} counts replication errors; its server log has the details",
            subscriber.1
        ));
    }
    Ok(causes.join("; "))
}

/// Columns and tables of the publisher that the subscriber lacks: what DDL on the serving
/// server during the upgrade (or the rollback window) leaves behind.
pub async fn schema_drift(
    (publisher, from): (&Client, Side),
    (subscriber, to): (&Client, Side),
) -> Result<Vec<String>> {
    let query = "SELECT format('%I.%I', n.nspname, c.relname), a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'pgshift_meta')
                   AND n.nspname NOT LIKE 'pg\\_temp\\_%'";
    let published = columns(publisher, from, query).await?;
    let subscribed = columns(subscriber, to, query).await?;
    let mut drift = Vec::new();
    for (table, column, kind) in &published {
        if !subscribed.iter().any(|(t, _, _)| t == table) {
            if !drift
                .iter()
                .any(|d: &String| d.contains(&format!("table {table} ")))
            {
                drift.push(format!(
                    "table {table} exists on the {from} but not on the {to} (created during the upgrade?): \
                     create it on the {to} with the same definition, then run ALTER SUBSCRIPTION ... REFRESH PUBLICATION"
                ));
            }
        } else if !subscribed.iter().any(|(t, c, _)| t == table && c == column) {
            drift.push(format!(
                "column {table}.{column} exists on the {from} but not on the {to} (DDL during the upgrade?): \
                 on the {to}, run SET default_transaction_read_only = off; ALTER TABLE {table} ADD COLUMN {} {kind} \
                 (pgshift keeps the {to} read-only while the other serves)",
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
