//! `pgshift verify`: every table of the target equals the source, checked while clients write
//! and the forward stream runs, at the same logical point of that stream.
//!
//! For each chunk of a table (a range of its primary key), one statement on the source sums
//! the chunk and writes the sum into the control table: one snapshot, one commit. The control
//! table is replicated like any other; on the target, a trigger that fires in the apply worker
//! sums the same range when the row applies, which is exactly after every transaction that
//! committed on the source before it, and records whether the two sums match. A transaction
//! that commits on the source between the statement's snapshot and its commit makes an honest
//! chunk differ: such a chunk is checked again, then halved (see `report::judge`), and only a
//! range that differs at every check is reported.

pub mod report;
pub(crate) mod sql;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, Result, Side, SqlContext};
use crate::names;
use crate::observe::Database;
use crate::upgrade::Upgrade;

use report::{judge, Bound, Checked, Range, Table, Verdict};
pub use report::{Mismatch, TableReport, VerifyReport};

/// How `verify` reads the source.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Rows per first-pass chunk.
    pub chunk_rows: u64,
    /// At most this many rows summed per second on the source (the target sums as many);
    /// `None`: as fast as the servers go.
    pub max_rows_per_s: Option<u64>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 10_000,
            max_rows_per_s: Some(100_000),
        }
    }
}

/// Where a run stands, for a progress display.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProgress {
    pub database: String,
    /// The table whose chunks are being written now.
    pub table: String,
    /// Checks written on the source, and answered by the target.
    pub submitted: u64,
    pub answered: u64,
    pub rows: i64,
    /// Ranges that differed at their latest check (being checked again).
    pub differing: usize,
}

pub type ProgressSink = Arc<dyn Fn(VerifyProgress) + Send + Sync>;

/// How long the target may take to answer a check before verify gives up: the forward stream
/// is not applying.
const ANSWER_WAIT: Duration = Duration::from_secs(300);

impl Upgrade {
    /// Verifies every moved database; removes what it installed whatever the outcome.
    pub async fn verify(
        &mut self,
        options: &VerifyOptions,
        progress: ProgressSink,
    ) -> Result<VerifyReport> {
        let started = Instant::now();
        let observed = self.observe().await?;
        for db in &observed {
            ready_to_verify(db)?;
        }
        let run_id = format!("{:016x}", rand::random::<u64>());
        let mut report = VerifyReport::default();
        for db in &observed {
            self.db(&db.name).await?;
            self.remove_verify_objects(db).await?;
            let outcome = self
                .verify_database(db, &run_id, options, &progress, &mut report)
                .await;
            let removed = self.remove_verify_objects(db).await;
            outcome?;
            removed?;
        }
        report.elapsed_ms = started.elapsed().as_millis();
        Ok(report)
    }

    async fn verify_database(
        &self,
        db: &Database,
        run_id: &str,
        options: &VerifyOptions,
        progress: &ProgressSink,
        report: &mut VerifyReport,
    ) -> Result<()> {
        let conns = self.conns(&db.name);
        let (source, target) = (&conns.source, target_of(db, conns.target.as_ref())?);
        install(source, target, &db.subscription_name()).await?;
        let tables = tables(source).await?;
        let mut run = Run {
            database: &db.name,
            run_id,
            source,
            target,
            tables: &tables,
            throttle: Throttle::new(options.max_rows_per_s),
            progress,
            next_request: 0,
            submitted: 0,
            answered: 0,
            rows: 0,
        };
        let first = report.tables.len();
        let mut pending = Vec::new();
        for (index, table) in tables.iter().enumerate() {
            report.tables.push(TableReport {
                database: db.name.clone(),
                table: display_name(table),
                key: table.key.clone(),
                chunks: 0,
                rows: 0,
                checks: 0,
                mismatches: 0,
            });
            let mut lower: Bound = None;
            loop {
                let upper = match table.key.is_empty() {
                    true => None,
                    false => {
                        run.bound(table, &lower, &None, options.chunk_rows as i64)
                            .await?
                    }
                };
                let range = Range {
                    table: index,
                    chunk: report.tables[first + index].chunks,
                    lower: lower.clone(),
                    upper: upper.clone(),
                    attempts: 0,
                };
                let (request, rows) = run.submit(&range).await?;
                let figures = &mut report.tables[first + index];
                figures.chunks += 1;
                figures.rows += rows;
                pending.push((request, range));
                if upper.is_none() {
                    break;
                }
                lower = upper;
            }
        }
        // Rounds: wait for every open check's answer, then check again, halve or report.
        while !pending.is_empty() {
            let answers = run.answers(&pending).await?;
            let mut next = Vec::new();
            let differing = answers.values().filter(|a| !a.matches).count();
            for (request, mut range) in pending {
                let checked = answers[&request].clone();
                range.attempts += 1;
                let table = &tables[range.table];
                report.tables[first + range.table].checks += 1;
                match judge(&range, &checked, !table.key.is_empty()) {
                    Verdict::Matched => {}
                    Verdict::Retry => next.push(range),
                    Verdict::Split => {
                        let half = (checked.source_rows / 2).max(1);
                        match run.bound(table, &range.lower, &range.upper, half).await? {
                            Some(middle) => {
                                let left = Range {
                                    upper: Some(middle.clone()),
                                    attempts: 0,
                                    ..range.clone()
                                };
                                let right = Range {
                                    lower: Some(middle),
                                    attempts: 0,
                                    ..range
                                };
                                next.extend([left, right]);
                            }
                            // The source has no row left to halve at: check it whole again.
                            None => next.push(range),
                        }
                    }
                    Verdict::Persistent => {
                        report.tables[first + range.table].mismatches += 1;
                        report.mismatches.push(Mismatch {
                            database: db.name.clone(),
                            table: display_name(table),
                            key: table.key.clone(),
                            chunk: range.chunk,
                            lower: range.lower,
                            upper: range.upper,
                            source_rows: checked.source_rows,
                            target_rows: checked.target_rows,
                            checks: range.attempts,
                            problem: checked.problem,
                        });
                    }
                }
            }
            pending = Vec::new();
            for range in next {
                let (request, _) = run.submit(&range).await?;
                pending.push((request, range));
            }
            run.report(differing, "");
        }
        Ok(())
    }

    /// Removes verify's objects from one database, the source's first. The target's go only
    /// once the stream has applied everything before the source's drop (a marker row proves
    /// it): a control row arriving for a dropped table would stop the apply worker.
    async fn remove_verify_objects(&self, db: &Database) -> Result<()> {
        let conns = self.conns(&db.name);
        if installed(&conns.source, Side::Source).await? {
            conns
                .source
                .batch_execute(&sql::drop_objects())
                .await
                .on(Side::Source, "dropping verify's tables and functions")?;
        }
        let Some(target) = conns.target.as_ref() else {
            return Ok(());
        };
        if !installed(target, Side::Target).await? {
            return Ok(());
        }
        let streaming = db.forward.subscription.as_ref().is_some_and(|s| s.enabled);
        if streaming {
            stream_applied_up_to_now(&conns.source, target).await?;
        }
        target
            .batch_execute(&sql::drop_objects())
            .await
            .on(Side::Target, "dropping verify's tables and functions")
    }
}

/// Verify compares the source with the target through the running forward stream, before the
/// cutover, once the initial copy is done.
fn ready_to_verify(db: &Database) -> Result<()> {
    let why = if db.switched() {
        Some(format!(
            "database {} was switched to the target: verify compares the source with the target \
             through the forward stream, before the cutover",
            db.name
        ))
    } else {
        match &db.forward.subscription {
            None => Some(format!(
                "database {} has no forward stream: start it with `pgshift run --cutover manual`, \
                 then verify once `pgshift status` says ready_for_cutover",
                db.name
            )),
            Some(sub) if !sub.enabled || !sub.worker_running => Some(format!(
                "the forward stream of database {} is not applying (disabled, or its worker is not \
                 running): `pgshift status` names the cause; fix it, then verify again",
                db.name
            )),
            Some(sub) if sub.tables_ready < sub.tables_total => Some(format!(
                "the initial copy of database {} is still running ({} of {} tables ready): verify \
                 once `pgshift status` says catch_up or ready_for_cutover",
                db.name, sub.tables_ready, sub.tables_total
            )),
            Some(_) => None,
        }
    };
    match why {
        Some(why) => Err(Error::NotReady { why }),
        None => Ok(()),
    }
}

fn target_of<'a>(db: &Database, target: Option<&'a Client>) -> Result<&'a Client> {
    target.ok_or_else(|| Error::NotReady {
        why: format!("database {} does not exist on the target", db.name),
    })
}

fn display_name(table: &Table) -> String {
    format!("{}.{}", table.schema, table.name)
}

async fn installed(client: &Client, side: Side) -> Result<bool> {
    Ok(client
        .query_one(&sql::installed(), &[])
        .await
        .on(side, "looking for verify's objects")?
        .get(0))
}

/// The functions on both servers, the control table on both (the subscription carries its
/// rows once refreshed), and the target's trigger.
async fn install(source: &Client, target: &Client, subscription: &str) -> Result<()> {
    for (server, side) in [(source, Side::Source), (target, Side::Target)] {
        server
            .batch_execute(&format!(
                "{};{}",
                sql::create_control_table(),
                sql::create_functions()
            ))
            .await
            .on(side, "installing verify's table and functions")?;
    }
    target
        .batch_execute(&sql::create_target_objects())
        .await
        .on(Side::Target, "installing verify's trigger")?;
    publish_control_table(source).await?;
    target
        .batch_execute(&format!(
            "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = false)",
            crate::sql::ident(subscription)
        ))
        .await
        .on(
            Side::Target,
            "adding verify's control table to the forward subscription",
        )
}

/// Puts the control table into the forward publication: nothing to do for one `FOR ALL
/// TABLES`, `ADD TABLE` for a publication of a table list. The one place the control table's
/// membership is decided.
pub(crate) async fn publish_control_table(source: &Client) -> Result<()> {
    let listed: bool = source
        .query_one(
            "SELECT NOT puballtables AND NOT EXISTS (
                 SELECT 1 FROM pg_publication_tables t
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3)
             FROM pg_publication p WHERE p.pubname = $1",
            &[
                &names::PUBLICATION,
                &names::META_SCHEMA,
                &sql::CONTROL_TABLE,
            ],
        )
        .await
        .on(Side::Source, "reading the forward publication")?
        .get(0);
    if !listed {
        return Ok(());
    }
    source
        .batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            crate::sql::ident(names::PUBLICATION),
            crate::sql::qualified(names::META_SCHEMA, sql::CONTROL_TABLE)
        ))
        .await
        .on(
            Side::Source,
            "adding verify's control table to the publication",
        )
}

/// The source's tables the forward stream carries (every ordinary table outside the system's
/// and pgshift's schemas), with their columns and key.
async fn tables(source: &Client) -> Result<Vec<Table>> {
    let rows = source
        .query(
            "SELECT n.nspname::text, c.relname::text,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
                    coalesce((SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                                           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.n)
                              FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)
                              ORDER BY i.indisprimary DESC LIMIT 1), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'r' AND c.relpersistence = 'p'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
               AND n.nspname <> $1
             ORDER BY 1, 2",
            &[&names::META_SCHEMA],
        )
        .await
        .on(Side::Source, "listing the tables to verify")?;
    Ok(rows
        .iter()
        .map(|r| Table {
            schema: r.get(0),
            name: r.get(1),
            columns: r.get(2),
            key: r.get(3),
        })
        .collect())
}

/// Waits until the forward stream has applied every commit the source made before now: a
/// marker row written now arrives on the target (then it goes again on both).
async fn stream_applied_up_to_now(source: &Client, target: &Client) -> Result<()> {
    let marker = crate::sql::qualified(names::META_SCHEMA, names::MARKER_TABLE);
    let token = format!("pgshift_verify_{:016x}", rand::random::<u64>());
    source
        .execute(
            &format!("INSERT INTO {marker} (token) VALUES ($1)"),
            &[&token],
        )
        .await
        .on(Side::Source, "writing a marker row")?;
    let until = Instant::now() + ANSWER_WAIT;
    loop {
        let arrived: bool = target
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {marker} WHERE token = $1)"),
                &[&token],
            )
            .await
            .on(Side::Target, "looking for the marker row")?
            .get(0);
        if arrived {
            break;
        }
        if Instant::now() > until {
            return Err(Error::Timeout {
                what: "the forward stream applying verify's last rows".into(),
                waited: ANSWER_WAIT,
                detail: "verify's tables stay on the target until it has: `pgshift status` \
                         names what holds the stream up; `pgshift verify` or `pgshift abort` \
                         removes them later"
                    .into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source
        .execute(&format!("DELETE FROM {marker} WHERE token = $1"), &[&token])
        .await
        .on(Side::Source, "removing the marker row")?;
    Ok(())
}

/// One database's run: its sessions, request numbers and figures.
struct Run<'a> {
    database: &'a str,
    run_id: &'a str,
    source: &'a Client,
    target: &'a Client,
    tables: &'a [Table],
    throttle: Throttle,
    progress: &'a ProgressSink,
    next_request: i64,
    submitted: u64,
    answered: u64,
    rows: i64,
}

impl Run<'_> {
    /// The key `skip` rows into `[lower, upper)` on the source, if the range has more rows.
    async fn bound(&self, table: &Table, lower: &Bound, upper: &Bound, skip: i64) -> Result<Bound> {
        Ok(self
            .source
            .query_one(
                &sql::next_bound(),
                &[&table.schema, &table.name, &table.key, lower, upper, &skip],
            )
            .await
            .on(Side::Source, "finding the next chunk's boundary")?
            .get(0))
    }

    /// Sums `range` on the source and writes its control row; returns the request number
    /// and the rows summed.
    async fn submit(&mut self, range: &Range) -> Result<(i64, i64)> {
        let table = &self.tables[range.table];
        let request = self.next_request;
        self.next_request += 1;
        let rows: i64 = self
            .source
            .query_one(
                &sql::submit_chunk(),
                &[
                    &self.run_id,
                    &request,
                    &table.schema,
                    &table.name,
                    &table.columns,
                    &table.key,
                    &range.lower,
                    &range.upper,
                ],
            )
            .await
            .on(
                Side::Source,
                &format!("summing a chunk of {}", display_name(table)),
            )?
            .get(0);
        self.submitted += 1;
        self.rows += rows;
        self.report(0, &display_name(table));
        self.throttle.after(rows).await;
        Ok((request, rows))
    }

    /// Waits until the target has answered every request of `pending`.
    async fn answers(&mut self, pending: &[(i64, Range)]) -> Result<HashMap<i64, Checked>> {
        let requests: Vec<i64> = pending.iter().map(|(r, _)| *r).collect();
        let mut answers = HashMap::new();
        let mut last_news = Instant::now();
        while answers.len() < requests.len() {
            let waiting: Vec<i64> = requests
                .iter()
                .copied()
                .filter(|r| !answers.contains_key(r))
                .collect();
            let rows = self
                .target
                .query(&sql::read_results(), &[&self.run_id, &waiting])
                .await
                .on(Side::Target, "reading verify's results")?;
            if !rows.is_empty() {
                last_news = Instant::now();
            }
            for row in rows {
                answers.insert(
                    row.get(0),
                    Checked {
                        source_rows: row.get(1),
                        target_rows: row.get(2),
                        matches: row.get(3),
                        problem: row.get(4),
                    },
                );
                self.answered += 1;
            }
            if answers.len() == requests.len() {
                break;
            }
            if last_news.elapsed() > ANSWER_WAIT {
                return Err(Error::Timeout {
                    what: format!("the target's answers to verify's checks of database {}", self.database),
                    waited: ANSWER_WAIT,
                    detail: "the forward stream applied none of them: `pgshift status` names what holds it up; fix that and verify again".into(),
                });
            }
            self.report(0, "");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(answers)
    }

    fn report(&self, differing: usize, table: &str) {
        (self.progress)(VerifyProgress {
            database: self.database.to_string(),
            table: table.to_string(),
            submitted: self.submitted,
            answered: self.answered,
            rows: self.rows,
            differing,
        });
    }
}

/// Keeps the source's summed rows per second under the limit.
struct Throttle {
    limit: Option<u64>,
    started: Instant,
    rows: u64,
}

impl Throttle {
    fn new(limit: Option<u64>) -> Throttle {
        Throttle {
            limit,
            started: Instant::now(),
            rows: 0,
        }
    }

    async fn after(&mut self, rows: i64) {
        self.rows += rows.max(0) as u64;
        if let Some(pause) = pause_needed(self.limit, self.rows, self.started.elapsed()) {
            tokio::time::sleep(pause).await;
        }
    }
}

/// How long to wait so that `rows` summed since the start keep within `limit` per second.
fn pause_needed(limit: Option<u64>, rows: u64, elapsed: Duration) -> Option<Duration> {
    let limit = limit.filter(|l| *l > 0)?;
    let due = Duration::from_secs_f64(rows as f64 / limit as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_waits_until_the_rows_fit_the_rate() {
        assert_eq!(
            pause_needed(Some(1000), 500, Duration::from_millis(100)),
            Some(Duration::from_millis(400))
        );
        assert_eq!(pause_needed(Some(1000), 500, Duration::from_secs(1)), None);
        assert_eq!(pause_needed(None, 1_000_000, Duration::ZERO), None);
        assert_eq!(pause_needed(Some(0), 1_000_000, Duration::ZERO), None);
    }
}
