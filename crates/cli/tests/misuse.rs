//! pgshift used the way people use it at 3 a.m.: commands in the wrong order, two terminals at
//! once, a pgshift killed or frozen inside the fence. Under a live ledger load through
//! PgBouncer: nothing acknowledged is lost, no transaction fails, no client stays paused past
//! `--max-pause` plus 2 s — without anyone rerunning pgshift — and a finished upgrade can never
//! be undone.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{pgshift_objects, through, APP_PASSWORD, APP_USER};
use pgshift_lab::ledger::{Ledger, LedgerHandle, LoadOptions};
use support::{nothing_lost, paused_entries, recorded, stderr, succeeds, until, CliLab, Running};

const MAX_PAUSE: Duration = Duration::from_secs(2);
/// What the issue allows past `--max-pause` for a release nobody asked for.
const RELEASE_SLACK: Duration = Duration::from_secs(2);
/// The longest a client may wait where a fence is held to its budget and then released, with
/// a second for the machine being busy.
const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// A transaction through PgBouncer that stays in flight for `seconds`, so that PAUSE waits.
fn long_transaction(
    lab: &CliLab,
    seconds: f64,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    let config = lab.bouncer.client_config("app", APP_USER, APP_PASSWORD);
    tokio::spawn(async move {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("BEGIN; SELECT pg_sleep({seconds}); COMMIT"))
            .await
    })
}

/// A cutover whose PAUSE waits on a transaction in flight for `seconds`: returned once its
/// fence is recorded, so the switch cannot have happened yet (nor will it before the
/// transaction ends).
async fn cutover_held_in_the_fence(
    lab: &CliLab,
    seconds: f64,
) -> (
    Running,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let long = long_transaction(lab, seconds);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cutover = lab.spawn(&lab.args("cutover", &["--max-pause", "2s"]));
    until("the fence", Duration::from_secs(20), || {
        recorded(&lab.pair.target, "fenced")
    })
    .await;
    (cutover, long)
}

/// Clients commit again, and PgBouncer pauses nothing, within `within` — nobody reran pgshift.
async fn clients_released(lab: &CliLab, load: &LedgerHandle, within: Duration) {
    let before = load.snapshot().committed;
    until("clients committing again", within, || async {
        load.snapshot().committed > before + 10
    })
    .await;
    assert!(
        paused_entries(&lab.bouncer).await.is_empty(),
        "PgBouncer still pauses entries"
    );
}

#[tokio::test]
async fn a_finished_upgrade_survives_cleanup_and_abort_in_any_order() {
    let lab = CliLab::start(15, 18).await;
    succeeds(&lab, &lab.args("run", &["--cutover", "manual"]));
    succeeds(&lab, &lab.args("cutover", &[]));
    succeeds(&lab, &lab.direct_args("cleanup", &[]));

    // The new server takes a write after the cleanup.
    let client_config = lab.bouncer.client_config("app", APP_USER, APP_PASSWORD);
    let (client, connection) = client_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "INSERT INTO ledger_entries (txid, client) VALUES ('written-after-cleanup', 0)",
        )
        .await
        .unwrap();

    let again = succeeds(&lab, &lab.direct_args("cleanup", &[]));
    assert!(again.contains("already cleaned up"), "{again}");
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("phase: done"), "{status}");
    assert!(status.contains("switched to the target at"), "{status}");
    assert!(status.contains("cleaned up"), "{status}");

    let abort = lab.output(&lab.direct_args("abort", &[]));
    assert!(!abort.status.success(), "abort undid a finished upgrade");
    assert!(
        stderr(&abort).contains("abort can never undo the upgrade"),
        "{}",
        stderr(&abort)
    );
    let on_target: i64 = lab
        .pair
        .target
        .connect("app")
        .await
        .expect("the new database is still there")
        .query_one(
            "SELECT count(*) FROM ledger_entries WHERE txid = 'written-after-cleanup'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_target, 1, "the row written after cleanup is gone");
    // `run` again says it is done, and changes nothing.
    let rerun = succeeds(&lab, &lab.args("run", &[]));
    assert!(rerun.contains("finished: done"), "{rerun}");
    // The old server keeps only its read-only setting: nobody writes there by mistake.
    assert_eq!(
        pgshift_objects(&lab.pair.source, &["app"]).await,
        ["app: setting default_transaction_read_only=on"]
    );
}

#[tokio::test]
async fn a_second_cutover_exits_at_once_naming_the_first_which_carries_on() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    succeeds(&lab, &lab.args("run", &["--cutover", "manual"]));

    // The first cutover's PAUSE waits on a long transaction until its budget runs out.
    let (first, long) = cutover_held_in_the_fence(&lab, 4.0).await;

    let started = Instant::now();
    let second = lab.output(&lab.args("cutover", &["--max-pause", "2s"]));
    let said = stderr(&second);
    assert_eq!(
        second.status.code(),
        Some(3),
        "the second cutover ran:\n{said}"
    );
    assert!(
        said.contains("another pgshift is working on this upgrade"),
        "{said}"
    );
    assert!(
        said.contains(&format!("pgshift cutover pid {}", first.pid())),
        "the holder is not named: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the second cutover did not exit at once"
    );

    // The first was left alone: its attempt aborted at its budget, clients resumed.
    let (code, said) = first.finish(Duration::from_secs(5));
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("cutover aborted after"), "{said}");
    assert!(!said.contains("not paused"), "{said}");
    long.await.unwrap().expect("the long transaction commits");
    succeeds(&lab, &lab.args("cutover", &[]));
    nothing_lost(load, &lab.pair.target, LONGEST_WAIT).await;
}

#[tokio::test]
async fn a_second_run_exits_at_once_naming_the_first() {
    let lab = CliLab::start(15, 18).await;
    common::exec(
        &lab.pair.source,
        "app",
        "CREATE TABLE big (id bigserial PRIMARY KEY, payload text);
         INSERT INTO big (payload) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 300000) g;",
    )
    .await;
    let mut first = lab.spawn(&lab.args("run", &["--cutover", "manual"]));
    first.wait_for("initial copy", Duration::from_secs(60));
    let second = lab.output(&lab.args("run", &["--cutover", "manual"]));
    let said = stderr(&second);
    assert_eq!(second.status.code(), Some(3), "{said}");
    assert!(
        said.contains(&format!("pgshift run pid {}", first.pid())),
        "the holder is not named: {said}"
    );
    assert!(!said.contains("read-only"), "a misleading error: {said}");
    let (code, said) = first.finish(Duration::from_secs(5));
    assert_eq!(code, Some(0), "the first run was disturbed:\n{said}");
}

#[tokio::test]
async fn a_pgshift_killed_inside_the_fence_releases_clients_on_the_source_by_itself() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    succeeds(&lab, &lab.args("run", &["--cutover", "manual"]));
    // PAUSE waits on a transaction that outlasts the kill: the fence is up, the switch cannot
    // have happened (a shorter one ended before the kill under load, and the cutover with it).
    let (mut cutover, long) = cutover_held_in_the_fence(&lab, 5.0).await;
    cutover.kill();
    let killed = Instant::now();
    let guard = cutover.rest(MAX_PAUSE + RELEASE_SLACK).join("\n");
    assert!(guard.contains("ended inside the cutover"), "{guard}");
    assert!(guard.contains("clients released"), "{guard}");
    clients_released(&lab, &load, MAX_PAUSE + RELEASE_SLACK - killed.elapsed()).await;
    long.await.unwrap().expect("the long transaction commits");
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("phase: ready_for_cutover"), "{status}");
    assert!(!status.contains("fence up"), "{status}");

    // A rerun finishes; the release cost nobody an error.
    let rerun = succeeds(&lab, &lab.args("run", &[]));
    assert!(rerun.contains("finished: window_open"), "{rerun}");
    nothing_lost(load, &lab.pair.target, MAX_PAUSE + RELEASE_SLACK).await;
}

#[tokio::test]
async fn a_frozen_pgshift_is_ended_by_its_guard_and_status_names_the_fence_meanwhile() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    succeeds(&lab, &lab.args("run", &["--cutover", "manual"]));
    let (mut cutover, long) = cutover_held_in_the_fence(&lab, 5.0).await;
    cutover.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("fence up since"), "{status}");
    assert!(
        status.contains(&format!("raised by pgshift cutover pid {}", cutover.pid())),
        "{status}"
    );
    assert!(
        status.contains("its guard releases the clients"),
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "in progress: pgshift cutover pid {}",
            cutover.pid()
        )),
        "{status}"
    );
    let guard = cutover
        .rest(MAX_PAUSE + RELEASE_SLACK + Duration::from_secs(1))
        .join("\n");
    assert!(guard.contains("overran the pause budget"), "{guard}");
    assert!(guard.contains("clients released"), "{guard}");
    assert!(
        frozen.elapsed() < MAX_PAUSE + RELEASE_SLACK,
        "released {:?} after the freeze",
        frozen.elapsed()
    );
    clients_released(&lab, &load, Duration::from_secs(1)).await;
    long.await.unwrap().expect("the long transaction commits");
    let rerun = succeeds(&lab, &lab.args("run", &[]));
    assert!(rerun.contains("finished: window_open"), "{rerun}");
    nothing_lost(load, &lab.pair.target, LONGEST_WAIT).await;
}

#[tokio::test]
async fn a_pgshift_killed_after_recording_the_switch_has_its_guard_finish_the_switch() {
    let lab = CliLab::start(15, 18).await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    succeeds(&lab, &lab.args("run", &["--cutover", "manual"]));
    // Opening the target for writes waits on this transaction's hold on the same setting:
    // the switch gets recorded, the cutover stops right after.
    let hold = lab.pair.target.connect("postgres").await.unwrap();
    hold.batch_execute("BEGIN; ALTER DATABASE app SET default_transaction_read_only = on")
        .await
        .unwrap();
    let mut cutover = lab.spawn(&lab.args("cutover", &["--max-pause", "3s"]));
    until("the switch record", Duration::from_secs(20), || {
        recorded(&lab.pair.target, "switched")
    })
    .await;
    cutover.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    hold.batch_execute("ROLLBACK").await.unwrap();
    let guard = cutover.rest(Duration::from_secs(5)).join("\n");
    assert!(guard.contains("ended inside the cutover"), "{guard}");
    assert!(guard.contains("clients released"), "{guard}");
    clients_released(&lab, &load, Duration::from_secs(2)).await;
    let config = std::fs::read_to_string(lab.bouncer.config_path()).unwrap();
    assert!(
        config.contains(&format!("port={}", lab.pair.target.port())),
        "PgBouncer was not moved to the target:\n{config}"
    );
    let status = succeeds(&lab, &lab.direct_args("status", &[]));
    assert!(status.contains("switched to the target at"), "{status}");
    succeeds(&lab, &lab.direct_args("cleanup", &[]));
    nothing_lost(
        load,
        &lab.pair.target,
        Duration::from_secs(3) + RELEASE_SLACK,
    )
    .await;
}
