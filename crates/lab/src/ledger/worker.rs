//! One ledger client: transfers in a loop, reconnecting on connection loss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_literal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio_postgres::error::Severity;
use tokio_postgres::{Client, Config, SimpleQueryMessage};

use super::stats::ClientRecord;
use super::{Outcome, Sample};

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
const MAX_AMOUNT: i64 = 100;

/// Where a run is: clients loop while `Running`, stop before their next attempt at
/// `Stopping`, and abandon an in-flight attempt at `Abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Stopping,
    Abort,
}

/// Live counters shared by the clients and the handle.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) committed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) in_doubt: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// What a client needs to run.
pub(crate) struct ClientSpec {
    pub(crate) id: usize,
    pub(crate) run_id: Arc<str>,
    /// Endpoints tried in order on every (re)connect.
    pub(crate) configs: Arc<[Config]>,
    pub(crate) connect_timeout: Duration,
    /// Age at which a connection is replaced between transactions.
    pub(crate) max_connection_lifetime: Option<Duration>,
    /// Time between attempt starts when rate-limited.
    pub(crate) interval: Option<Duration>,
    pub(crate) started: Instant,
    pub(crate) counters: Arc<Counters>,
    pub(crate) phase: watch::Receiver<Phase>,
}

/// The transfer as one simple-query message: one implicit transaction, atomic, no prepared
/// statements (works through transaction pooling). Account rows are updated in id order so
/// concurrent clients cannot deadlock.
pub(crate) fn transfer_sql(txid: &str, client: usize, from: u32, to: u32, amount: i64) -> String {
    let debit =
        format!("UPDATE ledger_accounts SET balance = balance - {amount} WHERE id = {from};");
    let credit =
        format!("UPDATE ledger_accounts SET balance = balance + {amount} WHERE id = {to};");
    let (first, second) = if from < to {
        (debit, credit)
    } else {
        (credit, debit)
    };
    format!(
        "INSERT INTO ledger_entries (txid, client, from_acct, to_acct, amount) VALUES ({}, {client}, {from}, {to}, {amount}); {first} {second}",
        escape_literal(txid)
    )
}

/// How an attempt that returned an error ended.
///
/// A server `ERROR` means the transaction rolled back. A `FATAL`/`PANIC` or a connection
/// exception (SQLSTATE class 08, which PgBouncer uses when a server connection dies) means
/// the session ended around the statement: it may have committed. No error from the server
/// at all (I/O, closed) is in doubt too.
pub(crate) fn classify(err: &tokio_postgres::Error) -> Outcome {
    match err.as_db_error() {
        Some(db) => {
            let session_ended = matches!(
                db.parsed_severity(),
                Some(Severity::Fatal) | Some(Severity::Panic)
            );
            if session_ended || db.code().code().starts_with("08") {
                Outcome::InDoubt
            } else {
                Outcome::Failed
            }
        }
        None => Outcome::InDoubt,
    }
}

/// A stable message for the tally: SQLSTATE and message (no per-row detail).
pub(crate) fn error_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => crate::describe(err),
    }
}

pub(crate) async fn run_client(spec: ClientSpec) -> ClientRecord {
    let mut record = ClientRecord::default();
    let mut rng = StdRng::from_entropy();
    // The session and when it was opened.
    let mut connection: Option<(Client, Instant)> = None;
    // The session was retired for its age: the next successful connect is a reconnect.
    let mut retired = false;
    // Learned from the database on the first connection.
    let mut accounts: Option<u32> = None;
    let mut backoff = MIN_BACKOFF;
    let mut n: u64 = 0;
    // Spread rate-limited clients over one interval.
    let mut next_due = spec
        .interval
        .map(|interval| Instant::now() + interval.mul_f64(rng.gen_range(0.0..1.0)));

    loop {
        if *spec.phase.borrow() != Phase::Running {
            break;
        }
        if let (Some(due), Some(interval)) = (next_due, spec.interval) {
            if !sleep_while_running(&spec.phase, due).await {
                break;
            }
            let now = Instant::now();
            // After a stall, carry on at the rate instead of bursting to catch up.
            next_due = Some((due + interval).max(now));
        }

        // Checked here, between transactions, so that a session that aged while the client
        // slept is retired too. Dropping the client ends the session cleanly (Terminate).
        if let Some((_, opened)) = &connection {
            if spec
                .max_connection_lifetime
                .is_some_and(|lifetime| opened.elapsed() >= lifetime)
            {
                connection = None;
                retired = true;
            }
        }
        let (client, opened) = match connection.take() {
            Some((client, opened)) if !client.is_closed() => (client, opened),
            _ => match open(&spec, accounts).await {
                Ok((client, count)) => {
                    backoff = MIN_BACKOFF;
                    accounts = Some(count);
                    if retired {
                        retired = false;
                        record.reconnects += 1;
                        spec.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    (client, Instant::now())
                }
                Err(message) => {
                    if *spec.phase.borrow() != Phase::Running {
                        break;
                    }
                    record.connect_failures += 1;
                    spec.counters
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    record.errors.add(&format!("connect: {message}"), 1);
                    if !sleep_while_running(&spec.phase, Instant::now() + backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };

        n += 1;
        let txid = format!("c{}-{n}-{}", spec.id, spec.run_id);
        let count = accounts.unwrap_or(2);
        let from = rng.gen_range(1..=count);
        let to = loop {
            let to = rng.gen_range(1..=count);
            if to != from {
                break to;
            }
        };
        let sql = transfer_sql(&txid, spec.id, from, to, rng.gen_range(1..=MAX_AMOUNT));

        let start = Instant::now();
        let result = {
            let mut abort = spec.phase.clone();
            tokio::select! {
                result = client.batch_execute(&sql) => Some(result),
                _ = abort.wait_for(|phase| *phase == Phase::Abort) => None,
            }
        };
        let latency = start.elapsed();
        let outcome = match &result {
            Some(Ok(())) => Outcome::Committed,
            Some(Err(e)) => classify(e),
            None => Outcome::InDoubt,
        };
        match (&result, outcome) {
            (Some(Ok(())), _) => {
                spec.counters.committed.fetch_add(1, Ordering::Relaxed);
                record.acknowledged.push(txid);
            }
            (Some(Err(e)), Outcome::Failed) => {
                spec.counters.failed.fetch_add(1, Ordering::Relaxed);
                record
                    .errors
                    .add(&format!("failed: {}", error_message(e)), 1);
            }
            (Some(Err(e)), _) => {
                spec.counters.in_doubt.fetch_add(1, Ordering::Relaxed);
                record
                    .errors
                    .add(&format!("in doubt: {}", error_message(e)), 1);
                record.in_doubt.push(txid);
            }
            (None, _) => {
                spec.counters.in_doubt.fetch_add(1, Ordering::Relaxed);
                record
                    .errors
                    .add("in doubt: abandoned in flight when the run was stopped", 1);
                record.in_doubt.push(txid);
            }
        }
        record.samples.push(Sample {
            start_us: micros(start.saturating_duration_since(spec.started)),
            latency_us: u32::try_from(latency.as_micros()).unwrap_or(u32::MAX),
            outcome,
        });
        // Keep the session unless it may be broken.
        if outcome != Outcome::InDoubt && !client.is_closed() {
            connection = Some((client, opened));
        }
    }
    record.accounts = accounts.unwrap_or(0);
    record
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Connects to the first endpoint that accepts (each bounded by the timeout per host,
/// all interrupted by a stop request) and learns the number of accounts if still unknown.
async fn open(spec: &ClientSpec, accounts: Option<u32>) -> Result<(Client, u32), String> {
    let attempt = async {
        let client = connect(spec).await?;
        let count = match accounts {
            Some(count) => count,
            None => count_accounts(&client).await?,
        };
        Ok((client, count))
    };
    let mut phase = spec.phase.clone();
    tokio::select! {
        result = attempt => result,
        _ = phase.wait_for(|p| *p != Phase::Running) => Err("stopped".to_string()),
    }
}

async fn connect(spec: &ClientSpec) -> Result<Client, String> {
    let mut last_error = String::from("no endpoint to connect to");
    for config in spec.configs.iter() {
        let hosts = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        let limit = spec.connect_timeout.saturating_mul(hosts);
        match tokio::time::timeout(limit, crate::tls::connect(config)).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => last_error = error_message(&e),
            Err(_) => last_error = format!("timed out after {limit:?}"),
        }
    }
    Err(last_error)
}

async fn count_accounts(client: &Client) -> Result<u32, String> {
    let messages = client
        .simple_query("SELECT count(*) FROM ledger_accounts")
        .await
        .map_err(|e| format!("cannot count the ledger accounts: {}", error_message(&e)))?;
    let count = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<u32>().ok()),
            _ => None,
        })
        .unwrap_or(0);
    if count < 2 {
        return Err(format!(
            "ledger_accounts has {count} rows: install the ledger first (Ledger::install)"
        ));
    }
    Ok(count)
}

/// Sleeps until `until`; false if the run stopped meanwhile.
async fn sleep_while_running(phase: &watch::Receiver<Phase>, until: Instant) -> bool {
    let mut watcher = phase.clone();
    tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => *phase.borrow() == Phase::Running,
        _ = watcher.wait_for(|p| *p != Phase::Running) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_updates_lower_account_first_and_escapes_the_txid() {
        let sql = transfer_sql("c1-2-x'y", 1, 9, 3, 42);
        assert!(sql.starts_with(
            "INSERT INTO ledger_entries (txid, client, from_acct, to_acct, amount) VALUES ('c1-2-x''y', 1, 9, 3, 42);"
        ));
        let credit = sql.find("balance + 42 WHERE id = 3").unwrap();
        let debit = sql.find("balance - 42 WHERE id = 9").unwrap();
        assert!(credit < debit);
        let sql = transfer_sql("t", 0, 2, 5, 7);
        assert!(sql.find("WHERE id = 2").unwrap() < sql.find("WHERE id = 5").unwrap());
    }
}
