//! Read-only looks at a database for comparisons: what each side of an upgrade holds.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::error::{Error, Result};

/// A table's row count and an order-independent digest of its rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableChecksum {
    /// Number of rows.
    pub rows: i64,
    /// md5 of the rows' text forms, sorted and joined (empty for an empty table).
    pub md5: String,
}

/// Session settings that fix the text form of values, so servers of different majors and
/// configurations render equal rows equally.
const STABLE_OUTPUT: &str = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, MDY'; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1; \
     SET LOCAL bytea_output = 'hex'";

/// Every ordinary table outside the system and `pgshift*` schemas, keyed by its quoted
/// `schema.table` name (e.g. `public.ledger_accounts`), with its checksum. Runs in one
/// read-only transaction (a consistent snapshot) and leaves the session's settings alone.
/// Meant for lab-sized tables: each table's rows are aggregated in memory on the server.
pub async fn table_checksums(client: &Client) -> Result<BTreeMap<String, TableChecksum>> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {STABLE_OUTPUT}"
        ))
        .await
        .map_err(|e| Error::pg("cannot start the checksum transaction", e))?;
    let result = checksums_in_transaction(client).await;
    let ended = client.batch_execute("ROLLBACK").await;
    let sums = result?;
    ended.map_err(|e| Error::pg("cannot end the checksum transaction", e))?;
    Ok(sums)
}

async fn checksums_in_transaction(client: &Client) -> Result<BTreeMap<String, TableChecksum>> {
    let tables = rows(
        client,
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r'
           AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
           AND n.nspname NOT LIKE 'pgshift%'
         ORDER BY 1",
    )
    .await?;
    let mut sums = BTreeMap::new();
    for table in tables {
        let Some(name) = table.first().cloned().flatten() else {
            continue;
        };
        // `name` was quoted by the server's format('%I.%I').
        let row = rows(
            client,
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {name} t"
            ),
        )
        .await?;
        let (count, md5) = match row.first().map(Vec::as_slice) {
            Some([Some(count), Some(md5)]) => (count.clone(), md5.clone()),
            _ => {
                return Err(Error::UnexpectedReply(format!(
                    "no checksum row for {name}"
                )))
            }
        };
        let rows = count
            .parse()
            .map_err(|_| Error::UnexpectedReply(format!("row count {count:?} for {name}")))?;
        sums.insert(name, TableChecksum { rows, md5 });
    }
    Ok(sums)
}

async fn rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| Error::pg(format!("checksum query failed: {sql}"), e))?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}
