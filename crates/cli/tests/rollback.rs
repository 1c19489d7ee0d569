//! The way back: after the switch the old server follows the new one (the rollback window),
//! and `pgshift rollback` is the cutover in the other direction, under a live ledger load.
//! Every acknowledged commit — before the switch, on the new server during the window, after
//! the rollback — ends up on the old server exactly once; the upgrade can then be tried again.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use common::{caught_up, pgshift_objects, through, APP_PASSWORD, APP_USER};
use pgshift_lab::ledger::{Ledger, LedgerTarget, LoadOptions};
use support::{nothing_lost, nothing_lost_but_ended, paused_entries, stderr, succeeds, CliLab};

/// The port PgBouncer's entry `app` points at now.
fn pgbouncer_points_at(lab: &CliLab) -> u16 {
    let config = std::fs::read_to_string(lab.bouncer.config_path()).unwrap();
    let line = config
        .lines()
        .find(|l| l.trim_start().starts_with("app ="))
        .expect("entry app");
    line.split("port=")
        .nth(1)
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// The ledger's id sequence on `server` (the one clients write to) is past every id used on
/// `other`: read `other` first, since `server` only moves on.
async fn sequence_ahead(server: &pgshift_lab::PgServer, other: &pgshift_lab::PgServer) {
    let used: i64 = other
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT coalesce(max(n), 0) FROM ledger_entries", &[])
        .await
        .unwrap()
        .get(0);
    let last: i64 = server
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT last_value FROM ledger_entries_n_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        last >= used,
        "sequence at {last}, the other server used {used}"
    );
}

#[tokio::test]
async fn forward_then_back_through_pgbouncer_loses_nothing_and_the_upgrade_can_be_retried() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    let run = succeeds(&lab, &lab.args("run", &[]));
    assert!(run.contains("finished: window_open"), "{run}");
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.target.port());
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("phase: window_open"), "{status}");
    assert!(status.contains("rollback window open since"), "{status}");
    // The clients write on the new server for a while; the old one follows.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let back = succeeds(&lab, &lab.args("rollback", &[]));
    assert!(back.contains("rollback done"), "{back}");
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.source.port());
    assert!(paused_entries(&lab.bouncer).await.is_empty());
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("phase: ready_for_cutover"), "{status}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    sequence_ahead(&lab.pair.source, &lab.pair.target).await;
    // Every acknowledged commit, wherever it was made, is on the old server exactly once.
    nothing_lost(load, &lab.pair.source, Duration::from_secs(3)).await;

    // The forward stream resumed at the rollback: a second upgrade goes through.
    caught_up(&lab.pair.source, &lab.pair.target, "app", "ledger_entries").await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    let again = succeeds(&lab, &lab.args("run", &[]));
    assert!(again.contains("finished: window_open"), "{again}");
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.target.port());
    sequence_ahead(&lab.pair.target, &lab.pair.source).await;
    nothing_lost(load, &lab.pair.target, Duration::from_secs(3)).await;
    caught_up(&lab.pair.target, &lab.pair.source, "app", "ledger_entries").await;

    succeeds(&lab, &lab.direct_args("cleanup", &[]));
    assert_eq!(
        pgshift_objects(&lab.pair.source, &["app"]).await,
        ["app: setting default_transaction_read_only=on"],
        "the window's objects stay behind on the source"
    );
    assert!(
        pgshift_objects(&lab.pair.target, &["app"])
            .await
            .iter()
            .all(|o| o == "app: schema pgshift_meta"),
        "the window's objects stay behind on the target"
    );
}

#[tokio::test]
async fn direct_mode_goes_back_with_errors_only_for_ended_sessions() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(
        LedgerTarget::read_write(&[&lab.pair.source, &lab.pair.target], "app"),
        LoadOptions::new(4),
    );
    let run = succeeds(&lab, &lab.direct_args("run", &["--json"]));
    let forward: serde_json::Value = serde_json::from_str(&run).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = succeeds(&lab, &lab.direct_args("rollback", &["--json"]));
    let back: serde_json::Value = serde_json::from_str(&back).unwrap();
    assert_eq!(back["direction"], "back", "{back}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ended = forward["cutover"]["sessions_ended"].as_i64().unwrap()
        + back["sessions_ended"].as_i64().unwrap();
    nothing_lost_but_ended(load, &lab.pair.source, ended).await;
}

#[tokio::test]
async fn a_rollback_held_up_past_its_budget_leaves_clients_on_the_new_server_and_abort_follows_a_rollback(
) {
    let lab = CliLab::start(15, 18).await;
    succeeds(&lab, &lab.args("run", &[]));
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    // A transaction in flight on the new server until the rollback has given up: PAUSE
    // cannot finish within 1 s.
    let config = lab.bouncer.client_config("app", APP_USER, APP_PASSWORD);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let aborted = lab.output(&lab.args("rollback", &["--max-pause", "1s"]));
    let said = stderr(&aborted);
    assert!(!aborted.status.success(), "{said}");
    assert!(said.contains("cutover aborted after"), "{said}");
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.target.port());
    client
        .batch_execute("COMMIT")
        .await
        .expect("the long transaction commits on the new server");
    drop(client);
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("phase: window_open"), "{status}");

    succeeds(&lab, &lab.args("rollback", &[]));
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.source.port());
    nothing_lost(load, &lab.pair.source, Duration::from_secs(3)).await;

    // After a rollback the upgrade may also be given up: abort takes everything away, the
    // target database included, and the old server is as it was.
    let aborted = succeeds(&lab, &lab.direct_args("abort", &[]));
    assert!(aborted.contains("target databases: app"), "{aborted}");
    assert_eq!(
        pgshift_objects(&lab.pair.source, &["app"]).await,
        Vec::<String>::new()
    );
    assert_eq!(
        pgshift_objects(&lab.pair.target, &["app"]).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn ddl_on_the_new_server_during_the_window_makes_rollback_refuse_naming_it() {
    let lab = CliLab::start(15, 18).await;
    succeeds(&lab, &lab.args("run", &[]));
    common::exec(
        &lab.pair.target,
        "app",
        "ALTER TABLE ledger_accounts ADD COLUMN note text;
         CREATE TABLE audit (id int PRIMARY KEY); INSERT INTO audit VALUES (1);",
    )
    .await;
    let refused = lab.output(&lab.args("rollback", &[]));
    let said = stderr(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("rollback refused for database app"), "{said}");
    assert!(
        said.contains(
            "column public.ledger_accounts.note exists on the target but not on the source"
        ),
        "{said}"
    );
    assert!(said.contains("public.audit"), "{said}");
    // Nobody was paused, clients stay on the new server.
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.target.port());
    assert!(paused_entries(&lab.bouncer).await.is_empty());
}

/// Stderr lines at which pgshift is killed, per command: each step of opening the window,
/// then each step of the rollback.
const WINDOW_KILLS: [&str; 3] = [
    "app: ProtectSource",
    "app: DropStream(Forward)",
    "app: CreateSubscription(Back)",
];
const ROLLBACK_KILLS: [&str; 5] = [
    "app: CreateSlot",
    "cutover: fence",
    "app: ProtectTarget",
    "app: DropStream(Back)",
    "app: CreateSubscription(Forward)",
];

#[tokio::test]
async fn killed_at_every_step_of_the_window_and_the_rollback_it_converges() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    for (command, points) in [
        ("run", &WINDOW_KILLS[..]),
        ("rollback", &ROLLBACK_KILLS[..]),
    ] {
        let args = lab.args(command, &[]);
        for point in points {
            let mut running = lab.spawn(&args);
            running.wait_for(point, Duration::from_secs(120));
            running.kill();
            // Inside a fence, the guard outlives the kill and releases the clients.
            running.rest(Duration::from_secs(10));
        }
        succeeds(&lab, &args);
    }
    assert_eq!(pgbouncer_points_at(&lab), lab.pair.source.port());
    tokio::time::sleep(Duration::from_secs(1)).await;
    nothing_lost(load, &lab.pair.source, Duration::from_secs(5)).await;
    // Forward again, then the window ended: nothing of pgshift's stays on either side.
    succeeds(&lab, &lab.args("run", &[]));
    succeeds(&lab, &lab.direct_args("cleanup", &[]));
    assert_eq!(
        pgshift_objects(&lab.pair.source, &["app"]).await,
        ["app: setting default_transaction_read_only=on"]
    );
    assert!(pgshift_objects(&lab.pair.target, &["app"])
        .await
        .iter()
        .all(|o| o == "app: schema pgshift_meta"));
}
