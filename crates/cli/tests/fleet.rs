//! A fleet of PgBouncers (`--pgbouncer` repeated, each with its `--pgbouncer-config`), each
//! carrying part of a live ledger load: paused together, all or nothing — one that cannot pause
//! (a client holding a transaction open through it) aborts the attempt on every one, naming that
//! client — repointed and resumed together; a pgshift killed while they are paused has its guard
//! release every one of them.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{through, APP_PASSWORD, APP_USER};
use pgshift_lab::ledger::{Ledger, LedgerHandle, LoadOptions};
use pgshift_lab::PgBouncer;
use support::{
    nothing_lost, paused_entries, recorded, stderr, stdout, succeeds, until, CliLab, Running,
};

const MAX_PAUSE: Duration = Duration::from_secs(2);
/// What the issue allows past `--max-pause` for a release nobody asked for.
const RELEASE_SLACK: Duration = Duration::from_secs(2);
/// The longest a client may wait where a fence is held to its budget and then released, with
/// a second for the machine being busy.
const LONGEST_WAIT: Duration = Duration::from_secs(5);
/// The application name of the client that leaves a transaction open.
const HOLDER: &str = "held-open-by-test";

/// The CLI lab's PgBouncer and a second one with its own config file and console.
struct Fleet {
    // Stopped before the lab's directory, which holds its own, goes.
    second: PgBouncer,
    lab: CliLab,
}

impl Fleet {
    async fn start() -> Fleet {
        let lab = CliLab::start(15, 18).await;
        let second = lab.bouncer.another("second").await.unwrap();
        let mut pgpass = std::fs::read_to_string(&lab.pgpass).unwrap();
        pgpass.push_str(&second.admin_pgpass_entry().line());
        pgpass.push('\n');
        std::fs::write(&lab.pgpass, pgpass).unwrap();
        Fleet { lab, second }
    }

    fn bouncers(&self) -> [&PgBouncer; 2] {
        [&self.lab.bouncer, &self.second]
    }

    /// `command` with both PgBouncers, each console followed by its config file.
    fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args = self.lab.direct_args(command, &[]);
        for bouncer in self.bouncers() {
            args.extend([
                "--pgbouncer".to_string(),
                bouncer.admin_url(),
                "--pgbouncer-config".to_string(),
                bouncer.config_path().display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Half of the load through each PgBouncer.
    fn load(&self) -> [LedgerHandle; 2] {
        self.bouncers()
            .map(|bouncer| Ledger::run(through(bouncer), LoadOptions::new(2)))
    }

    /// The port every `[databases]` entry of `bouncer`'s config points at.
    fn points_at(bouncer: &PgBouncer) -> Vec<u16> {
        std::fs::read_to_string(bouncer.config_path())
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with("app ="))
            .filter_map(|l| {
                l.split("port=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    fn all_point_at(&self, port: u16) {
        for bouncer in self.bouncers() {
            assert_eq!(
                Fleet::points_at(bouncer),
                [port],
                "{}",
                bouncer.config_path().display()
            );
        }
    }

    async fn none_paused(&self) {
        for bouncer in self.bouncers() {
            assert!(
                paused_entries(bouncer).await.is_empty(),
                "{} still pauses entries",
                bouncer.config_path().display()
            );
        }
    }
}

/// The ports of `bouncer`'s server connections (`SHOW SERVERS`).
async fn server_ports(bouncer: &PgBouncer) -> Vec<String> {
    bouncer
        .admin_connect()
        .await
        .unwrap()
        .simple_query("SHOW SERVERS")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("port").map(str::to_string),
            _ => None,
        })
        .collect()
}

/// Both loads commit again.
async fn committing(loads: &[LedgerHandle; 2], within: Duration) {
    let before = loads.each_ref().map(|l| l.snapshot().committed);
    until("clients committing through both", within, || async {
        loads
            .iter()
            .zip(before)
            .all(|(l, before)| l.snapshot().committed > before + 10)
    })
    .await;
}

/// A client of `bouncer` whose transaction failed and that never rolls back: its server
/// connection stays `idle in transaction (aborted)`, so that a PAUSE of its pool never ends.
async fn transaction_left_aborted(bouncer: &PgBouncer) -> tokio_postgres::Client {
    let mut config = bouncer.client_config("app", APP_USER, APP_PASSWORD);
    config.application_name(HOLDER);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pgbouncers_under_load_are_paused_repointed_and_resumed_together() {
    let fleet = Fleet::start().await;
    let loads = fleet.load();
    let run = succeeds(&fleet.lab, &fleet.args("run", &["--json"]));
    let report: serde_json::Value = serde_json::from_str(&run).unwrap();
    assert_eq!(report["finished"], "window_open", "{report}");
    assert_eq!(report["cutover"]["mode"], "pgbouncer", "{report}");
    eprintln!(
        "fleet of 2: pause {} ms",
        report["cutover"]["pause_ms"].as_f64().unwrap()
    );
    fleet.all_point_at(fleet.lab.pair.target.port());
    fleet.none_paused().await;
    committing(&loads, Duration::from_secs(5)).await;
    let target_port = fleet.lab.pair.target.port().to_string();
    for bouncer in fleet.bouncers() {
        let ports = server_ports(bouncer).await;
        assert!(
            !ports.is_empty() && ports.iter().all(|p| *p == target_port),
            "{}: server connections on ports {ports:?}, the target is {target_port}",
            bouncer.config_path().display()
        );
    }
    for load in loads {
        nothing_lost(load, &fleet.lab.pair.target, LONGEST_WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pgbouncer_that_cannot_pause_aborts_the_attempt_on_all_naming_the_blocking_client() {
    let fleet = Fleet::start().await;
    let loads = fleet.load();
    succeeds(&fleet.lab, &fleet.args("run", &["--cutover", "manual"]));
    let holder = transaction_left_aborted(&fleet.second).await;

    // While the PAUSE waits, status names the session that holds it up.
    let cutover = fleet
        .lab
        .spawn(&fleet.args("cutover", &["--max-pause", "4s"]));
    until("the fence", Duration::from_secs(20), || {
        recorded(&fleet.lab.pair.target, "fenced")
    })
    .await;
    // The fence is up for the whole of each attempt, down for a second between two.
    let mut status = String::new();
    let looking = Instant::now();
    while !status.contains("held up by pid") && looking.elapsed() < Duration::from_secs(10) {
        let output = fleet.lab.output(&fleet.args("status", &[]));
        status = format!("{}{}", stdout(&output), stderr(&output));
    }
    assert!(status.contains("fence up since"), "{status}");
    for bouncer in fleet.bouncers() {
        let config = bouncer.config_path().display().to_string();
        assert!(
            status.contains(&config),
            "the fence names {config}: {status}"
        );
    }
    assert!(status.contains(HOLDER), "{status}");
    let started = Instant::now();
    let (code, said) = cutover.finish(Duration::from_secs(5));
    assert_eq!(code, Some(1), "{said}");
    eprintln!("aborted attempts took {:?}", started.elapsed());
    assert!(said.contains("cutover aborted"), "{said}");
    assert!(
        said.contains(&format!("application_name \"{HOLDER}\"")),
        "{said}"
    );
    assert!(said.contains("client 127.0.0.1:"), "{said}");
    assert!(
        said.contains("idle in transaction (aborted) since "),
        "{said}"
    );
    assert!(
        said.contains(&fleet.second.config_path().display().to_string()),
        "the blocking session's PgBouncer is named: {said}"
    );

    // All or nothing: both resumed on the source, nothing repointed.
    fleet.none_paused().await;
    fleet.all_point_at(fleet.lab.pair.source.port());
    committing(&loads, Duration::from_secs(5)).await;

    // The --json error carries the blocking session.
    let json = fleet
        .lab
        .output(&fleet.args("cutover", &["--max-pause", "600ms", "--json"]));
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    assert!(stdout(&json).contains(HOLDER), "{}", stdout(&json));
    fleet.none_paused().await;

    // Released, a rerun completes.
    holder.batch_execute("ROLLBACK").await.unwrap();
    let done = succeeds(&fleet.lab, &fleet.args("cutover", &["--json"]));
    let report: serde_json::Value = serde_json::from_str(&done).unwrap();
    eprintln!("after the release: pause {} ms", report["pause_ms"]);
    fleet.all_point_at(fleet.lab.pair.target.port());
    fleet.none_paused().await;
    for load in loads {
        nothing_lost(load, &fleet.lab.pair.target, LONGEST_WAIT + MAX_PAUSE).await;
    }
}

/// Ready for the cutover, then a cutover inside its fence: a transaction left open through the
/// first PgBouncer holds its PAUSE, the second pauses at once. Returns the running cutover and
/// the client holding the first one up.
async fn cutover_with_both_paused(fleet: &Fleet) -> (Running, tokio_postgres::Client) {
    succeeds(&fleet.lab, &fleet.args("run", &["--cutover", "manual"]));
    let holder = transaction_left_aborted(&fleet.lab.bouncer).await;
    let cutover = fleet
        .lab
        .spawn(&fleet.args("cutover", &["--max-pause", "2s"]));
    until("both paused", Duration::from_secs(20), || async {
        recorded(&fleet.lab.pair.target, "fenced").await
            && !paused_entries(&fleet.lab.bouncer).await.is_empty()
            && !paused_entries(&fleet.second).await.is_empty()
    })
    .await;
    (cutover, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgshift_killed_while_both_are_paused_has_its_guard_release_both() {
    let fleet = Fleet::start().await;
    let loads = fleet.load();
    let (mut cutover, holder) = cutover_with_both_paused(&fleet).await;
    cutover.kill();
    let killed = Instant::now();
    let guard = cutover.rest(MAX_PAUSE + RELEASE_SLACK).join("\n");
    assert!(guard.contains("ended inside the cutover"), "{guard}");
    assert!(guard.contains("clients released"), "{guard}");
    committing(&loads, MAX_PAUSE + RELEASE_SLACK).await;
    fleet.none_paused().await;
    eprintln!("both released {:?} after the kill", killed.elapsed());
    assert!(
        killed.elapsed() < MAX_PAUSE + RELEASE_SLACK,
        "released {:?} after the kill",
        killed.elapsed()
    );
    fleet.all_point_at(fleet.lab.pair.source.port());
    let status = succeeds(&fleet.lab, &fleet.lab.direct_args("status", &[]));
    assert!(!status.contains("fence up"), "{status}");
    holder.batch_execute("ROLLBACK").await.unwrap();

    let rerun = succeeds(&fleet.lab, &fleet.args("run", &[]));
    assert!(rerun.contains("finished: window_open"), "{rerun}");
    fleet.all_point_at(fleet.lab.pair.target.port());
    for load in loads {
        nothing_lost(load, &fleet.lab.pair.target, MAX_PAUSE + RELEASE_SLACK).await;
    }
}

/// One PgBouncer stops answering (its host hangs) just as pgshift dies inside the fence: the
/// guard releases the other one's clients within the budget, and the frozen one's once it
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_out_of_reach_keeps_no_other_paused_when_the_guard_releases() {
    let fleet = Fleet::start().await;
    let loads = fleet.load();
    let (mut cutover, holder) = cutover_with_both_paused(&fleet).await;
    fleet.lab.bouncer.freeze();
    cutover.kill();
    let killed = Instant::now();
    let second_load = &loads[1];
    let before = second_load.snapshot().committed;
    until(
        "clients committing through the PgBouncer that answers",
        MAX_PAUSE + RELEASE_SLACK,
        || async { second_load.snapshot().committed > before + 10 },
    )
    .await;
    eprintln!(
        "the reachable PgBouncer released {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        paused_entries(&fleet.second).await.is_empty(),
        "the reachable PgBouncer still pauses entries"
    );
    fleet.lab.bouncer.thaw();
    // The guard's login to the frozen console was waiting all along; it now gets through.
    let guard = cutover.rest(Duration::from_secs(30)).join("\n");
    assert!(guard.contains("clients released"), "{guard}");
    committing(&loads, Duration::from_secs(10)).await;
    fleet.none_paused().await;
    fleet.all_point_at(fleet.lab.pair.source.port());
    holder.batch_execute("ROLLBACK").await.unwrap();

    let rerun = succeeds(&fleet.lab, &fleet.args("run", &[]));
    assert!(rerun.contains("finished: window_open"), "{rerun}");
    for load in loads {
        nothing_lost(load, &fleet.lab.pair.target, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_and_config_files_that_do_not_pair_up_are_a_usage_error_that_changes_nothing() {
    let fleet = Fleet::start().await;
    let mut args = fleet.lab.direct_args("run", &[]);
    args.extend([
        "--pgbouncer".to_string(),
        fleet.lab.bouncer.admin_url(),
        "--pgbouncer-config".to_string(),
        fleet.lab.bouncer.config_path().display().to_string(),
        "--pgbouncer".to_string(),
        fleet.second.admin_url(),
    ]);
    let output = fleet.lab.output(&args);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(said.contains("2 consoles and 1 config files"), "{said}");
    assert!(said.contains("--pgbouncer-config"), "{said}");
    let target = fleet.lab.pair.target.connect("postgres").await.unwrap();
    let created: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'app'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 0, "the target got a database");
    assert!(
        common::pgshift_objects(&fleet.lab.pair.source, &["app"])
            .await
            .is_empty(),
        "pgshift created something on the source"
    );
    fleet.all_point_at(fleet.lab.pair.source.port());
}
