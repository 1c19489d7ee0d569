//! Clients with their drivers' defaults write across a full `pgshift run`: through PgBouncer
//! (transaction mode, 1.24.1, which carries prepared statements from 1.21 on) with 0 failed,
//! and directly with each driver's multi-host read-write setting, where no more transactions
//! fail than the sessions the fence ended. Either way every commit a client saw is on the new
//! server afterwards. The clients (tests/drivers/) are real programs on the drivers that
//! `tools/setup.sh` installs into the cache.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{exec, APP_PASSWORD, APP_USER};
use pgshift_lab::ledger::OPENING_BALANCE;
use support::CliLab;

/// What pgbench said about its run: transactions processed and failed.
fn pgbench_counts(said: &str) -> (i64, i64) {
    let number = |prefix: &str| {
        said.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("pgbench did not report {prefix:?}:\n{said}"))
    };
    (
        number("number of transactions actually processed:"),
        number("number of failed transactions:"),
    )
}

#[tokio::test]
async fn pgbench_with_prepared_statements_crosses_the_cutover() {
    let lab = CliLab::start(15, 18).await;
    exec(
        &lab.pair.source,
        "app",
        &format!("GRANT CREATE ON SCHEMA public TO {APP_USER}"),
    )
    .await;
    let pgbench = lab.pair.target.bin_dir().join("pgbench");
    let connection = |command: &mut Command| {
        command
            .args([
                "-h",
                lab.bouncer.host(),
                "-p",
                &lab.bouncer.port().to_string(),
            ])
            .args(["-U", APP_USER, "app"])
            .env("PGPASSWORD", APP_PASSWORD)
            .env_remove("PGPASSFILE");
    };
    // The tables directly on the source (pgbench -i runs DDL), the keyless history made
    // replicable, then the load through PgBouncer.
    let mut init = Command::new(&pgbench);
    init.args(["-i", "-q", "-s", "2", "-h", lab.pair.source.host()])
        .args([
            "-p",
            &lab.pair.source.port().to_string(),
            "-U",
            APP_USER,
            "app",
        ])
        .env("PGPASSWORD", APP_PASSWORD);
    let done = init.output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    exec(
        &lab.pair.source,
        "app",
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
    )
    .await;

    let mut load = Command::new(&pgbench);
    load.args(["-n", "-M", "prepared", "-c", "4", "-T", "25"]);
    connection(&mut load);
    let load = load
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let run = lab.output(&lab.args("run", &[]));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let finished = load.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&finished.stdout),
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(finished.status.success(), "pgbench failed:\n{said}");
    let (processed, failed) = pgbench_counts(&said);
    assert_eq!(failed, 0, "{said}");
    assert!(processed > 0, "{said}");
    // Each pgbench transaction inserts one history row: all of them are on the new server.
    let history: i64 = lab
        .pair
        .target
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, processed, "{said}");
}

/// A client program of tests/drivers/ and the driver it runs on.
#[derive(Debug, Clone, Copy)]
enum Driver {
    Psycopg,
    Asyncpg,
    NodePostgres,
    Pgjdbc,
}

const SETUP_HINT: &str = "run `cargo xtask setup` (tools/setup.sh installs the drivers)";
/// The ledger's accounts (`ledger_database` installs 100).
const ACCOUNTS: i64 = 100;
/// Commits a client makes before pgshift starts, and after it has finished.
const COMMITS_AROUND_THE_RUN: usize = 30;

impl Driver {
    fn tag(self) -> &'static str {
        match self {
            Driver::Psycopg => "psycopg",
            Driver::Asyncpg => "asyncpg",
            Driver::NodePostgres => "node",
            Driver::Pgjdbc => "jdbc",
        }
    }

    /// The client's command line, without its connection and run arguments.
    fn command(self) -> Command {
        let cache = pgshift_lab::testing::require_binaries()
            .cache_dir()
            .join("drivers");
        let programs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers");
        let installed = |path: PathBuf| {
            assert!(path.exists(), "{} is missing: {SETUP_HINT}", path.display());
            path
        };
        match self {
            Driver::Psycopg | Driver::Asyncpg => {
                let mut command = Command::new(installed(cache.join("python/bin/python")));
                command
                    .arg(programs.join("ledger.py"))
                    .args(["--driver", self.tag()]);
                command
            }
            Driver::NodePostgres => {
                let mut command = Command::new("node");
                command
                    .env("NODE_PATH", installed(cache.join("node/node_modules")))
                    .arg(programs.join("ledger.js"));
                command
            }
            Driver::Pgjdbc => {
                // The source-file launcher compiles Ledger.java as it starts.
                let jars = installed(cache.join("jdbc/jars"));
                let mut command = Command::new("java");
                command
                    .arg("-cp")
                    .arg(jars.join("*"))
                    .arg(programs.join("Ledger.java"));
                command
            }
        }
    }
}

/// What a client printed when it stopped.
#[derive(Debug, serde::Deserialize)]
struct ClientReport {
    version: String,
    committed: usize,
    /// Transactions begun that did not commit.
    failed: usize,
    /// Connection attempts refused (no transaction begun).
    connect_errors: usize,
    errors: BTreeMap<String, usize>,
}

/// A client writing the ledger as the application, until [`Load::stop`].
struct Load {
    driver: Driver,
    /// Taken by [`Load::stop`]; killed on drop otherwise (a test that failed).
    child: Option<Child>,
    committed_path: PathBuf,
    stop_path: PathBuf,
}

impl Load {
    /// `servers` are (host, port), tried in order; `read_write` asks the driver for the one
    /// that takes writes.
    fn start(driver: Driver, servers: &[(&str, u16)], read_write: bool, dir: &Path) -> Load {
        let committed_path = dir.join(format!("{}-committed", driver.tag()));
        let stop_path = dir.join(format!("{}-stop", driver.tag()));
        let hosts: Vec<String> = servers.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let mut command = driver.command();
        command
            .args(["--hosts", &hosts.join(",")])
            .args(["--dbname", "app", "--user", APP_USER, "--workers", "4"])
            .args(["--tag", driver.tag()])
            .arg("--committed")
            .arg(&committed_path)
            .arg("--stop")
            .arg(&stop_path)
            .env("PGPASSWORD", APP_PASSWORD)
            .env_remove("PGPASSFILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if read_write {
            command.arg("--read-write");
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{driver:?} client: {e}"));
        Load {
            driver,
            child: Some(child),
            committed_path,
            stop_path,
        }
    }

    fn committed(&self) -> Vec<String> {
        lines_of(&self.committed_path)
    }

    /// Waits until `more` commits beyond those made so far (the JVM and Python start slowly
    /// on a busy machine: a generous bound).
    fn wait_for_commits(&mut self, more: usize) {
        let want = self.committed().len() + more;
        let until = Instant::now() + Duration::from_secs(120);
        while self.committed().len() < want {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the {:?} client exited ({status}) before committing",
                    self.driver
                );
            }
            assert!(
                Instant::now() < until,
                "the {:?} client did not reach {want} commits",
                self.driver
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the workers; the client's report and every txid it saw committed.
    fn stop(mut self) -> (ClientReport, Vec<String>) {
        std::fs::write(&self.stop_path, "").unwrap();
        let child = self.child.take().expect("running");
        let output = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{:?} client:\n{said}", self.driver);
        let line = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let report: ClientReport = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{:?} client's report ({e}):\n{said}", self.driver));
        let committed = lines_of(&self.committed_path);
        assert_eq!(committed.len(), report.committed, "{report:?}");
        (report, committed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The lines of a file, none if it does not exist yet.
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Committed txids missing on `server`; the balances there must add up (each transfer moves
/// an amount between two accounts in one transaction).
async fn lost_on(server: &pgshift_lab::PgServer, driver: Driver, committed: &[String]) -> usize {
    let client = server.connect("app").await.unwrap();
    let present: HashSet<String> = client
        .query(
            "SELECT txid FROM ledger_entries WHERE starts_with(txid, $1)",
            &[&format!("{}-", driver.tag())],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let total: i64 = client
        .query_one("SELECT sum(balance)::int8 FROM ledger_accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        total,
        ACCOUNTS * OPENING_BALANCE,
        "the balances do not add up"
    );
    committed.iter().filter(|t| !present.contains(*t)).count()
}

/// Sessions of the application's user on `server`.
async fn app_sessions(server: &pgshift_lab::PgServer) -> i64 {
    server
        .connect("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&APP_USER],
        )
        .await
        .unwrap()
        .get(0)
}

/// PgBouncer's server connections: (port, prepared statements held on it).
async fn bouncer_servers(bouncer: &pgshift_lab::PgBouncer) -> Vec<(u16, u32)> {
    support::console_rows(bouncer, "SHOW SERVERS")
        .await
        .iter()
        .filter(|r| r.get("user") == Some(APP_USER))
        .map(|r| {
            let number = |column: &str| -> u32 {
                r.get(column)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("SHOW SERVERS has no {column}"))
            };
            (number("port") as u16, number("prepared_statements"))
        })
        .collect()
}

/// The `pgshift run --json` report's cutover: (pause in ms, sessions ended).
fn cutover_figures(run: &str) -> (f64, i64) {
    let report: serde_json::Value =
        serde_json::from_str(run).unwrap_or_else(|e| panic!("{e}: {run}"));
    let cutover = &report["cutover"];
    (
        cutover["pause_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{report}")),
        cutover["sessions_ended"]
            .as_i64()
            .unwrap_or_else(|| panic!("{report}")),
    )
}

/// Through PgBouncer: a full run with the client writing before, during and after; nothing
/// failed or lost, PgBouncer's server connections all on the new server afterwards and
/// holding the client's prepared statements there (PgBouncer prepares each on a server
/// connection the first time a client's named statement runs on it: commits after the switch
/// executed them on the new server).
async fn crosses_the_cutover_through_pgbouncer(driver: Driver) {
    let lab = CliLab::start(15, 18).await;
    let mut load = Load::start(
        driver,
        &[(lab.bouncer.host(), lab.bouncer.port())],
        false,
        lab.pair.dir.path(),
    );
    load.wait_for_commits(COMMITS_AROUND_THE_RUN);
    let run = support::succeeds(&lab, &lab.args("run", &["--json"]));
    let (pause_ms, _) = cutover_figures(&run);
    load.wait_for_commits(COMMITS_AROUND_THE_RUN);

    let servers = bouncer_servers(&lab.bouncer).await;
    let target = lab.pair.target.port();
    assert!(
        !servers.is_empty() && servers.iter().all(|(port, _)| *port == target),
        "PgBouncer's server connections (port, prepared statements) are not all on the target {target}: {servers:?}"
    );
    assert!(
        servers.iter().any(|(_, prepared)| *prepared > 0),
        "no server connection on the target holds a prepared statement: {servers:?}"
    );
    assert_eq!(
        app_sessions(&lab.pair.source).await,
        0,
        "sessions left on the source"
    );
    assert!(app_sessions(&lab.pair.target).await > 0);

    let (report, committed) = load.stop();
    let lost = lost_on(&lab.pair.target, driver, &committed).await;
    println!(
        "figures: {driver:?} ({}) through PgBouncer: {} committed, {} failed, {} connection errors, {lost} lost, pause {pause_ms:.0} ms, errors {:?}",
        report.version, report.committed, report.failed, report.connect_errors, report.errors
    );
    assert_eq!(report.failed + report.connect_errors, 0, "{report:?}");
    assert_eq!(lost, 0, "{report:?}");
}

/// Direct mode: the driver lists both servers and asks for the one that takes writes. The
/// fence makes the source's database read-only and ends its sessions: a transaction of an
/// ended session fails, the driver reconnects to the target once the switch opens it. No more
/// transactions fail than sessions were ended, nothing committed is lost, and no session of
/// the application is left on the source.
async fn follows_the_cutover_with_read_write_hosts(driver: Driver) {
    let lab = CliLab::start(15, 18).await;
    let mut load = Load::start(
        driver,
        &[
            (lab.pair.source.host(), lab.pair.source.port()),
            (lab.pair.target.host(), lab.pair.target.port()),
        ],
        true,
        lab.pair.dir.path(),
    );
    load.wait_for_commits(COMMITS_AROUND_THE_RUN);
    let run = support::succeeds(&lab, &lab.direct_args("run", &["--json"]));
    let (pause_ms, ended) = cutover_figures(&run);
    load.wait_for_commits(COMMITS_AROUND_THE_RUN);
    assert_eq!(
        app_sessions(&lab.pair.source).await,
        0,
        "sessions left on the source"
    );
    assert!(app_sessions(&lab.pair.target).await > 0);

    let (report, committed) = load.stop();
    let lost = lost_on(&lab.pair.target, driver, &committed).await;
    println!(
        "figures: {driver:?} ({}) direct: {} committed, {} failed, {} connection errors, {lost} lost, {ended} sessions ended, pause {pause_ms:.0} ms, errors {:?}",
        report.version, report.committed, report.failed, report.connect_errors, report.errors
    );
    assert_eq!(lost, 0, "{report:?}");
    assert!(
        report.failed as i64 <= ended,
        "{} transactions failed, {ended} sessions ended: {report:?}",
        report.failed
    );
}

#[tokio::test]
async fn psycopg_through_pgbouncer() {
    crosses_the_cutover_through_pgbouncer(Driver::Psycopg).await;
}

#[tokio::test]
async fn asyncpg_through_pgbouncer() {
    crosses_the_cutover_through_pgbouncer(Driver::Asyncpg).await;
}

#[tokio::test]
async fn node_postgres_through_pgbouncer() {
    crosses_the_cutover_through_pgbouncer(Driver::NodePostgres).await;
}

#[tokio::test]
async fn pgjdbc_hikaricp_through_pgbouncer() {
    crosses_the_cutover_through_pgbouncer(Driver::Pgjdbc).await;
}

#[tokio::test]
async fn psycopg_direct_with_read_write_hosts() {
    follows_the_cutover_with_read_write_hosts(Driver::Psycopg).await;
}

#[tokio::test]
async fn asyncpg_direct_with_read_write_hosts() {
    follows_the_cutover_with_read_write_hosts(Driver::Asyncpg).await;
}

#[tokio::test]
async fn node_postgres_direct_reconnecting_to_the_writable_host() {
    follows_the_cutover_with_read_write_hosts(Driver::NodePostgres).await;
}

#[tokio::test]
async fn pgjdbc_hikaricp_direct_with_target_server_type_primary() {
    follows_the_cutover_with_read_write_hosts(Driver::Pgjdbc).await;
}
