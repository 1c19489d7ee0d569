//! What crosses with the switch: the marker row that proves the server clients go to has every
//! commit of the one they leave, and every sequence.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use super::inputs::{Clock, Server};
use crate::error::{Result, SqlContext};
use crate::names;
use crate::sql;

/// How often `to` is asked whether the marker has arrived.
pub(crate) const MARKER_POLL: Duration = Duration::from_millis(1);

/// Writes a marker row into `from`'s database and waits until `to` has applied it: apply is in
/// commit order, so every commit before the fence is on `to` then.
pub(crate) async fn wait_for_marker(
    from: &Server<'_>,
    to: &Server<'_>,
    index: usize,
    name: &str,
    clock: &Clock<'_>,
) -> Result<()> {
    let token = format!("{}-{}", name, rand::random::<u64>());
    let marker = sql::qualified(names::META_SCHEMA, names::MARKER_TABLE);
    from.databases[index]
        .execute(
            &format!("INSERT INTO {marker} (token) VALUES ($1)"),
            &[&token],
        )
        .await
        .on(from.side, "writing the marker row")?;
    let there = to.databases[index];
    let probe = there
        .prepare(&format!(
            "SELECT EXISTS (SELECT 1 FROM {marker} WHERE token = $1)"
        ))
        .await
        .on(to.side, "preparing the marker probe")?;
    while !clock.remaining().is_zero() {
        let arrived: bool = there
            .query_one(&probe, &[&token])
            .await
            .on(to.side, "looking for the marker row")?
            .get(0);
        if arrived {
            return Ok(());
        }
        tokio::time::sleep(MARKER_POLL).await;
    }
    Err(clock.over(&format!("waiting for the marker row on the {}", to.side)))
}

/// Sequence values of one database: (schema, name) → last value.
pub(crate) type SequenceValues = HashMap<(String, String), i64>;

/// Reads every sequence of the database that has a value (all of pg_sequences, not only those
/// owned by a column).
async fn read_sequences(server: &Server<'_>, index: usize) -> Result<SequenceValues> {
    let rows = server.databases[index]
        .query(
            "SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences
             WHERE last_value IS NOT NULL AND schemaname <> $1",
            &[&names::META_SCHEMA],
        )
        .await
        .on(server.side, "reading sequences")?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Sets sequences, all in one round trip.
async fn set_sequences(
    client: &Client,
    server: &Server<'_>,
    values: &[(&(String, String), i64)],
) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = values.iter().map(|((s, _), _)| s.as_str()).collect();
    let sequences: Vec<&str> = values.iter().map(|((_, s), _)| s.as_str()).collect();
    let last_values: Vec<i64> = values.iter().map(|(_, value)| *value).collect();
    let called = vec![true; values.len()];
    client
        .query_one(
            sql::SET_SEQUENCES,
            &[&schemas, &sequences, &last_values, &called],
        )
        .await
        .on(server.side, "setting sequences")?;
    Ok(())
}

/// Before the fence: copies every sequence, so that inside it only those that moved since
/// need setting (most sequences of a large schema are idle). Returns what was copied.
pub(crate) async fn precopy_sequences(
    from: &Server<'_>,
    to: &Server<'_>,
    index: usize,
) -> Result<SequenceValues> {
    let values = read_sequences(from, index).await?;
    let all: Vec<_> = values.iter().map(|(k, v)| (k, *v)).collect();
    set_sequences(to.databases[index], to, &all).await?;
    Ok(values)
}

/// Inside the fence: reads every sequence again (writes have stopped, so these values are
/// final) and sets on `to` those that differ from the pre-copy. Nothing but pgshift changes a
/// sequence on `to`, which takes no client writes until the switch. Returns how many sequences
/// `to` now has in step.
pub(crate) async fn copy_sequences(
    from: &Server<'_>,
    to: &Server<'_>,
    index: usize,
    copied: &SequenceValues,
) -> Result<usize> {
    let values = read_sequences(from, index).await?;
    let moved: Vec<(&(String, String), i64)> = values
        .iter()
        .filter(|(key, value)| copied.get(*key) != Some(*value))
        .map(|(key, value)| (key, *value))
        .collect();
    set_sequences(to.databases[index], to, &moved).await?;
    Ok(values.len())
}
