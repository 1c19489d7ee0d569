//! What a switch writes down, in the target's databases, before it moves traffic (`recover`
//! relies on that order): the forward switch with the target LSN the back stream starts from,
//! and a rollback with the source LSN the forward stream resumes from.

use futures_util::future::try_join_all;

use super::fence::open_databases;
use super::inputs::Switch;
use crate::decide::Direction;
use crate::error::{Result, Side, SqlContext};
use crate::observe;
use crate::sql;

/// Records the switch in every target database, then opens `to`'s databases for writes: the
/// switch point each record reads must come before any client write to `to`.
pub(crate) async fn record_and_open(sw: &Switch<'_>) -> Result<()> {
    let record = match sw.direction {
        Direction::Forward => {
            let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            sql::record_switch(&at)
        }
        Direction::Back => {
            // The source has taken nothing but the back stream's changes since the switch: the
            // forward stream resumes right after this point.
            let point: String = sw
                .to
                .admin
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .on(Side::Source, "reading the rollback's switch point")?
                .get(0);
            sql::record_rollback(&point)
        }
    };
    try_join_all(sw.records.iter().map(|target| async {
        target
            .batch_execute(&record)
            .await
            .on(Side::Target, "recording the switch")
    }))
    .await?;
    open_databases(&sw.to, sw.databases).await
}

/// A target database pgshift created says so in its comment, which lets abort drop it; after
/// the forward switch nothing may, so the comment changes, and a rollback changes it back.
pub(crate) async fn mark_created_databases(sw: &Switch<'_>) -> Result<()> {
    let target = match sw.direction {
        Direction::Forward => &sw.to,
        Direction::Back => &sw.from,
    };
    for (name, session) in sw.databases.iter().zip(&sw.records) {
        let comment: Option<String> = target
            .admin
            .query_one(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                &[name],
            )
            .await
            .on(Side::Target, "reading the database comment")?
            .get(0);
        let ours = comment
            .as_deref()
            .is_some_and(|c| c.starts_with(sql::CREATED_DATABASE_COMMENT));
        if !ours {
            continue;
        }
        let statement = match observe::switch_record(session).await? {
            Some(at) => sql::mark_created_database_switched(name, &at),
            None => sql::mark_created_database(name),
        };
        target
            .admin
            .batch_execute(&statement)
            .await
            .on(Side::Target, "marking the database pgshift created")?;
    }
    Ok(())
}
