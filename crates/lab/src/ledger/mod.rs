//! The workload ledger: concurrent clients transfer money between accounts, each committed
//! transaction recorded under a unique id, so that after an upgrade we can prove every
//! acknowledged commit reached the new server exactly once and the total is unchanged.
//!
//! Tables (created by [`Ledger::install`]):
//! - `ledger_accounts(id int primary key, balance bigint not null)`, each starting at 1000;
//! - `ledger_entries(n bigserial primary key, txid text not null unique, client int not null,
//!   from_acct int, to_acct int, amount bigint, at timestamptz default now())`. The bigserial
//!   is deliberate: if sequences are not carried over at cutover, inserts on the new server
//!   collide and fail.

mod stats;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_literal;
use serde::{Serialize, Serializer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::{Client, Config, SimpleQueryMessage};

use crate::bouncer::PgBouncer;
use crate::error::{Error, Result};
use crate::random_token;
use crate::server::PgServer;
use stats::{build_report, ClientRecord, ErrorTally, RunInfo};
use worker::{run_client, ClientSpec, Counters, Phase};

/// Every account's opening balance.
pub const OPENING_BALANCE: i64 = 1000;

/// How an attempted transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged by the server: it must be on the new server after the upgrade.
    Committed,
    /// The server returned an error: definitely not committed.
    Failed,
    /// The connection broke while the statement was in flight: it may or may not have
    /// committed. Never counted as lost or as failed by the server.
    InDoubt,
}

/// One attempt, for latency plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// When the attempt started, in µs since the run started.
    pub start_us: u64,
    /// How long it took, in µs.
    pub latency_us: u32,
    /// How it ended.
    pub outcome: Outcome,
}

/// Where ledger clients connect: one driver config (possibly multi-host with
/// `target_session_attrs=read-write`), or several tried in order on every (re)connect — so
/// clients follow whichever server is writable even when the servers' passwords differ.
#[derive(Debug, Clone)]
pub struct LedgerTarget {
    configs: Vec<Config>,
}

impl LedgerTarget {
    /// Clients connect with `config`.
    pub fn new(config: Config) -> Self {
        LedgerTarget {
            configs: vec![config],
        }
    }

    /// Through PgBouncer's database `dbname` as `user`.
    pub fn bouncer(bouncer: &PgBouncer, dbname: &str, user: &str, password: &str) -> Self {
        LedgerTarget::new(bouncer.client_config(dbname, user, password))
    }

    /// Directly to `db` on one server, as its superuser.
    pub fn server(server: &PgServer, db: &str) -> Self {
        LedgerTarget::new(server.config(db))
    }

    /// Directly to `db` on the first of `servers` that accepts writes (each tried with
    /// `target_session_attrs=read-write`, as its superuser): direct mode, where clients
    /// reconnect to the new server once the old one is fenced read-only.
    pub fn read_write(servers: &[&PgServer], db: &str) -> Self {
        let configs = servers
            .iter()
            .map(|server| {
                let mut config = server.config(db);
                config.target_session_attrs(TargetSessionAttrs::ReadWrite);
                config
            })
            .collect();
        LedgerTarget { configs }
    }

    /// The driver configs, in the order clients try them.
    pub fn configs(&self) -> &[Config] {
        &self.configs
    }
}

impl From<Config> for LedgerTarget {
    fn from(config: Config) -> Self {
        LedgerTarget::new(config)
    }
}

/// How hard to drive the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Concurrent clients (each its own connection).
    pub clients: usize,
    /// Total transactions per second over all clients; `None` = as fast as possible.
    pub rate: Option<f64>,
    /// Limit for one connection attempt (per host).
    pub connect_timeout: Duration,
    /// How long [`LedgerHandle::stop`] lets in-flight transactions finish before abandoning
    /// them (they are then counted in doubt).
    pub stop_grace: Duration,
    /// Retire a connection once it is this old, as application pools do (HikariCP's
    /// `maxLifetime`, pgx's `MaxConnLifetime`): between two transactions, never during one,
    /// the client closes it and connects anew (counted in `reconnects`). `None`: a
    /// connection is kept until it breaks.
    pub max_connection_lifetime: Option<Duration>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            clients: 4,
            rate: None,
            connect_timeout: Duration::from_secs(5),
            stop_grace: Duration::from_secs(30),
            max_connection_lifetime: None,
        }
    }
}

impl LoadOptions {
    /// `clients` clients at full speed, default timeouts.
    pub fn new(clients: usize) -> Self {
        LoadOptions {
            clients,
            ..LoadOptions::default()
        }
    }
}

/// Counters of a running ledger, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LedgerSnapshot {
    /// Acknowledged commits so far.
    pub committed: u64,
    /// Attempts the server rejected so far.
    pub failed: u64,
    /// Attempts whose outcome is unknown so far.
    pub in_doubt: u64,
    /// Failed connection attempts so far.
    pub connect_failures: u64,
    /// Connections replaced for their age so far.
    pub reconnects: u64,
    /// Time since the run started.
    #[serde(rename = "elapsed_s", serialize_with = "secs")]
    pub elapsed: Duration,
}

/// What a ledger run did. Its JSON form is the summary: the txid lists and `samples` are
/// left out (write `samples` on its own to plot latencies).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerReport {
    /// The run's id: every txid of the run ends with `-<run_id>`.
    pub run_id: String,
    /// Number of accounts.
    pub accounts: u32,
    /// Number of clients.
    pub clients: usize,
    /// Acknowledged commits.
    pub committed: u64,
    /// Attempts the server rejected (definitely not committed).
    pub failed: u64,
    /// Attempts whose connection broke in flight (maybe committed).
    pub in_doubt: u64,
    /// Failed connection attempts (clients reconnect and carry on).
    pub connect_failures: u64,
    /// Connections replaced because they reached [`LoadOptions::max_connection_lifetime`]
    /// (planned; not failures).
    pub reconnects: u64,
    /// From the run's start to the stop request.
    #[serde(rename = "duration_s", serialize_with = "secs")]
    pub duration: Duration,
    /// Commits per second.
    pub tps: f64,
    /// Median latency of committed transactions.
    pub p50_ms: f64,
    /// 99th percentile latency of committed transactions.
    pub p99_ms: f64,
    /// Highest latency of a committed transaction.
    pub max_ms: f64,
    /// `max_ms − p99_ms`: the extra wait a write pause added to the slowest commit.
    pub write_pause_ms: f64,
    /// Longest interval, after the first commit, in which no client committed.
    pub longest_commit_gap_ms: f64,
    /// Distinct error messages (prefixed `failed:`, `in doubt:` or `connect:`) with counts.
    pub errors: Vec<(String, u64)>,
    /// Txids of acknowledged commits, sorted.
    #[serde(skip)]
    pub acknowledged: Vec<String>,
    /// Txids of in-doubt attempts, sorted.
    #[serde(skip)]
    pub in_doubt_txids: Vec<String>,
    /// Every attempt, by start time.
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

/// What the new server holds compared with what the run acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Acknowledged commits of the run.
    pub expected: u64,
    /// Of those, present.
    pub found: u64,
    /// Acknowledged but missing: data loss.
    pub lost: u64,
    /// Extra copies of a txid.
    pub duplicated: u64,
    /// Rows of the run neither acknowledged nor in doubt.
    pub unexpected: u64,
    /// In-doubt attempts that did commit (fine either way).
    pub in_doubt_found: u64,
    /// `sum(balance) == accounts × 1000` over the expected number of accounts.
    pub invariant_holds: bool,
    /// Every balance equals 1000 plus its transfers in `ledger_entries` (catches an entry
    /// replicated without its balance updates, or the reverse).
    pub balances_match_entries: bool,
}

impl Verification {
    /// Nothing lost, duplicated or invented, and both invariants hold.
    pub fn is_ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.invariant_holds
            && self.balances_match_entries
    }
}

/// The ledger: install its tables, run clients against them, verify the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger;

impl Ledger {
    /// Creates the ledger tables and `accounts` accounts (at least 2) if missing
    /// (idempotent); errors if an existing ledger has a different number of accounts.
    pub async fn install(client: &Client, accounts: u32) -> Result<()> {
        if accounts < 2 {
            return Err(Error::InvalidOption(format!(
                "the ledger needs at least 2 accounts to transfer between, not {accounts}"
            )));
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS ledger_accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS ledger_entries (
                 n bigserial PRIMARY KEY,
                 txid text NOT NULL UNIQUE,
                 client int NOT NULL,
                 from_acct int,
                 to_acct int,
                 amount bigint,
                 at timestamptz DEFAULT now());
             INSERT INTO ledger_accounts (id, balance)
                 SELECT g, {OPENING_BALANCE} FROM generate_series(1, {accounts}) AS g
                 ON CONFLICT (id) DO NOTHING;"
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg("cannot install the ledger tables", e))?;
        let count = single_value(client, "SELECT count(*) FROM ledger_accounts").await?;
        if count != i64::from(accounts) {
            return Err(Error::Ledger(format!(
                "ledger_accounts has {count} accounts, not {accounts}: drop the ledger tables or install with {count} accounts"
            )));
        }
        Ok(())
    }

    /// Lets `role` run the ledger's transactions (read and write its tables, use its sequence).
    pub async fn grant(client: &Client, role: &str) -> Result<()> {
        let role = postgres_protocol::escape::escape_identifier(role);
        client
            .batch_execute(&format!(
                "GRANT SELECT, INSERT, UPDATE ON ledger_accounts, ledger_entries TO {role};
                 GRANT USAGE, SELECT ON SEQUENCE ledger_entries_n_seq TO {role};"
            ))
            .await
            .map_err(|e| Error::pg("cannot grant the ledger to its role", e))
    }

    /// Starts `opts.clients` clients writing through `target` (each learns the number of
    /// accounts from the database when it first connects); stop them with
    /// [`LedgerHandle::stop`].
    ///
    /// The clients run on threads of their own, whatever the caller's runtime is doing.
    /// Unusable options (no clients, a rate that is not a positive number) start nothing: the
    /// report then carries the reason as its only error.
    pub fn run(target: LedgerTarget, opts: LoadOptions) -> LedgerHandle {
        let run_id: Arc<str> = random_token(8).to_ascii_lowercase().into();
        let counters = Arc::new(Counters::default());
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let started = Instant::now();
        let mut handle = LedgerHandle {
            run_id: run_id.clone(),
            clients: opts.clients,
            started,
            stop_grace: opts.stop_grace,
            counters: counters.clone(),
            phase,
            tasks: Vec::new(),
            runtime: None,
            setup_error: None,
        };
        let interval = match check_load(&opts) {
            Ok(interval) => interval,
            Err(problem) => {
                tracing::error!(%problem, "ledger run not started");
                handle.setup_error = Some(problem);
                return handle;
            }
        };
        // The clients run on a runtime of their own: a test that waits for a child process
        // with a blocking call on its single-threaded runtime would otherwise stop the load for
        // exactly the moments it is meant to measure.
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ledger")
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(source) => {
                let problem = Error::LoadRuntime(source).to_string();
                tracing::error!(%problem, "ledger run not started");
                handle.setup_error = Some(problem);
                return handle;
            }
        };
        let configs: Arc<[Config]> = target
            .configs
            .into_iter()
            .map(|mut config| {
                config.connect_timeout(opts.connect_timeout);
                config
            })
            .collect();
        tracing::info!(run_id = %run_id, clients = opts.clients, rate = ?opts.rate, "ledger run starting");
        handle.tasks = (0..opts.clients)
            .map(|id| {
                runtime.spawn(run_client(ClientSpec {
                    id,
                    run_id: run_id.clone(),
                    configs: configs.clone(),
                    connect_timeout: opts.connect_timeout,
                    max_connection_lifetime: opts.max_connection_lifetime,
                    interval,
                    started,
                    counters: counters.clone(),
                    phase: phase_rx.clone(),
                }))
            })
            .collect();
        handle.runtime = Some(runtime);
        handle
    }

    /// Checks the ledger on (typically) the new server against a run's report.
    pub async fn verify(client: &Client, report: &LedgerReport) -> Result<Verification> {
        // Simple queries only: this also works through PgBouncer in transaction mode.
        let pattern = format!("%-{}", report.run_id);
        let sql = format!(
            "SELECT txid, count(*) FROM ledger_entries WHERE txid LIKE {} GROUP BY txid",
            escape_literal(&pattern)
        );
        let rows = client
            .simple_query(&sql)
            .await
            .map_err(|e| Error::pg("cannot read ledger_entries", e))?;
        let mut present: HashMap<String, u64> = HashMap::new();
        for message in rows {
            if let SimpleQueryMessage::Row(row) = message {
                let txid = row.get(0).unwrap_or_default().to_string();
                let count = parse_count(row.get(1))?;
                present.insert(txid, count);
            }
        }
        let found = report
            .acknowledged
            .iter()
            .filter(|txid| present.contains_key(*txid))
            .count() as u64;
        let in_doubt_found = report
            .in_doubt_txids
            .iter()
            .filter(|txid| present.contains_key(*txid))
            .count() as u64;
        let duplicated = present.values().map(|c| c.saturating_sub(1)).sum();
        let expected = report.acknowledged.len() as u64;
        let unexpected = (present.len() as u64).saturating_sub(found + in_doubt_found);

        let count = single_value(client, "SELECT count(*) FROM ledger_accounts").await?;
        let total = single_value(
            client,
            "SELECT coalesce(sum(balance), 0)::bigint FROM ledger_accounts",
        )
        .await?;
        // The clients saw this many accounts; if none ever connected, take the table's word.
        let accounts = match report.accounts {
            0 => count,
            seen => i64::from(seen),
        };
        let mismatched = single_value(
            client,
            &format!(
                "SELECT count(*) FROM ledger_accounts a LEFT JOIN (
                     SELECT acct, sum(delta) AS delta FROM (
                         SELECT from_acct AS acct, -amount AS delta FROM ledger_entries
                         UNION ALL
                         SELECT to_acct, amount FROM ledger_entries) d
                     GROUP BY acct) e ON e.acct = a.id
                 WHERE a.balance <> {OPENING_BALANCE} + coalesce(e.delta, 0)"
            ),
        )
        .await?;
        let verification = Verification {
            expected,
            found,
            lost: expected - found,
            duplicated,
            unexpected,
            in_doubt_found,
            invariant_holds: count == accounts && total == accounts * OPENING_BALANCE,
            balances_match_entries: mismatched == 0,
        };
        tracing::info!(?verification, "ledger verified");
        Ok(verification)
    }
}

/// A running ledger. Dropping it without [`LedgerHandle::stop`] aborts the clients.
pub struct LedgerHandle {
    run_id: Arc<str>,
    clients: usize,
    started: Instant,
    stop_grace: Duration,
    counters: Arc<Counters>,
    phase: watch::Sender<Phase>,
    tasks: Vec<JoinHandle<ClientRecord>>,
    /// What the clients run on; shut down (without waiting) when the handle goes.
    runtime: Option<tokio::runtime::Runtime>,
    /// Why no client was started, if none was.
    setup_error: Option<String>,
}

impl LedgerReport {
    /// The longest latency among committed attempts that were in flight at some moment of
    /// `[from, to]` (µs since the run started): what clients saw of a pause in that window.
    pub fn longest_in_window_ms(&self, from_us: u64, to_us: u64) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.outcome == Outcome::Committed)
            .filter(|s| s.start_us <= to_us && s.start_us + u64::from(s.latency_us) >= from_us)
            .map(|s| f64::from(s.latency_us) / 1e3)
            .fold(0.0, f64::max)
    }
}

impl LedgerHandle {
    /// When the run started: samples' `start_us` count from here.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The run's id (suffix of every txid).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Counters so far.
    pub fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot {
            committed: self.counters.committed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            in_doubt: self.counters.in_doubt.load(Ordering::Relaxed),
            connect_failures: self.counters.connect_failures.load(Ordering::Relaxed),
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops the clients — each finishes its in-flight transaction, or abandons it (in doubt)
    /// after `stop_grace` — and returns the report.
    pub async fn stop(mut self) -> LedgerReport {
        let duration = self.started.elapsed();
        self.phase.send_replace(Phase::Stopping);
        let tasks = std::mem::take(&mut self.tasks);
        let mut records = Vec::with_capacity(tasks.len() + 1);
        if let Some(problem) = self.setup_error.take() {
            let mut errors = ErrorTally::default();
            errors.add(&problem, 1);
            records.push(ClientRecord {
                errors,
                ..ClientRecord::default()
            });
        }
        let grace_end = tokio::time::Instant::now() + self.stop_grace;
        for mut task in tasks {
            let joined = match tokio::time::timeout_at(grace_end, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    tracing::warn!(run_id = %self.run_id, "in-flight transactions outlived the stop grace; abandoning them");
                    self.phase.send_replace(Phase::Abort);
                    task.await
                }
            };
            records.push(joined.unwrap_or_else(|e| {
                let mut errors = ErrorTally::default();
                errors.add(&format!("ledger client task ended abnormally: {e}"), 1);
                ClientRecord {
                    errors,
                    ..ClientRecord::default()
                }
            }));
        }
        let report = build_report(
            RunInfo {
                run_id: self.run_id.to_string(),
                clients: self.clients,
                duration,
            },
            records,
        );
        tracing::info!(
            run_id = %report.run_id,
            committed = report.committed,
            failed = report.failed,
            in_doubt = report.in_doubt,
            reconnects = report.reconnects,
            tps = report.tps,
            "ledger run stopped"
        );
        report
    }
}

impl Drop for LedgerHandle {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Abort);
        // Dropping a runtime blocks on its workers, which is refused inside async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn single_value(client: &Client, sql: &str) -> Result<i64> {
    let rows = client
        .simple_query(sql)
        .await
        .map_err(|e| Error::pg(format!("ledger query failed: {sql}"), e))?;
    let value = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0)),
        _ => None,
    });
    match value {
        Some(Some(text)) => text
            .parse()
            .map_err(|_| Error::UnexpectedReply(format!("{sql} returned {text:?}"))),
        _ => Err(Error::UnexpectedReply(format!("{sql} returned no value"))),
    }
}

/// The time between one client's attempts for the options' rate, or why the options are
/// unusable.
fn check_load(opts: &LoadOptions) -> std::result::Result<Option<Duration>, String> {
    if opts.clients == 0 {
        return Err(
            Error::InvalidOption("the ledger needs at least one client".into()).to_string(),
        );
    }
    match opts.rate {
        None => Ok(None),
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            Ok(Some(Duration::from_secs_f64(opts.clients as f64 / rate)))
        }
        Some(rate) => Err(Error::InvalidOption(format!(
            "ledger rate {rate}: give a positive number of transactions per second, or none for full speed"
        ))
        .to_string()),
    }
}

fn parse_count(value: Option<&str>) -> Result<u64> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::UnexpectedReply(format!("bad count {value:?} from ledger_entries")))
}

fn secs<S: Serializer>(duration: &Duration, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_load_options_are_explained() {
        assert!(check_load(&LoadOptions::new(0))
            .unwrap_err()
            .contains("at least one client"));
        let bad_rate = LoadOptions {
            rate: Some(0.0),
            ..LoadOptions::default()
        };
        assert!(check_load(&bad_rate)
            .unwrap_err()
            .contains("positive number"));
        let rated = LoadOptions {
            rate: Some(100.0),
            ..LoadOptions::new(4)
        };
        assert_eq!(check_load(&rated).unwrap(), Some(Duration::from_millis(40)));
        assert_eq!(check_load(&LoadOptions::new(4)).unwrap(), None);
    }

    /// The clients bring their own runtime: started from plain code they run (here they try
    /// to connect to no host at all) until stopped.
    #[test]
    fn run_outside_a_runtime_starts_its_clients() {
        let handle = Ledger::run(LedgerTarget::new(Config::new()), LoadOptions::new(1));
        std::thread::sleep(Duration::from_millis(200));
        let report = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(handle.stop());
        assert_eq!(report.committed, 0);
        assert!(report.connect_failures > 0, "{:?}", report.errors);
    }

    #[tokio::test]
    async fn unusable_options_start_nothing() {
        let handle = Ledger::run(LedgerTarget::new(Config::new()), LoadOptions::new(0));
        let report = handle.stop().await;
        assert_eq!(report.clients, 0);
        assert!(report.errors[0].0.contains("at least one client"));
    }

    #[test]
    fn report_json_is_a_summary() {
        let report = build_report(
            RunInfo {
                run_id: "abc".into(),
                clients: 1,
                duration: Duration::from_millis(1500),
            },
            vec![ClientRecord {
                samples: vec![Sample {
                    start_us: 0,
                    latency_us: 2000,
                    outcome: Outcome::Committed,
                }],
                acknowledged: vec!["c0-1-abc".into()],
                ..ClientRecord::default()
            }],
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["duration_s"], 1.5);
        assert_eq!(json["committed"], 1);
        assert_eq!(json["reconnects"], 0);
        assert!(json.get("acknowledged").is_none());
        assert!(json.get("samples").is_none());
        let sample = serde_json::to_value(report.samples[0]).unwrap();
        assert_eq!(sample["outcome"], "committed");
    }
}
