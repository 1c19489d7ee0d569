//! The pgshift process is killed (SIGKILL) at each phase boundary, in the middle of the initial
//! copy, during the index builds and inside the cutover (after PAUSE, before RESUME), while
//! clients write through PgBouncer. Each time, running it again carries on; at the end nothing is lost and no
//! transaction failed. Inside the cutover the fence guard releases the clients by itself.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use common::{exec, through};
use pgshift_lab::ledger::{Ledger, LoadOptions};
use support::{nothing_lost, paused_entries, CliLab};

/// Stderr lines of `pgshift run` at which the process is killed, in the order they come.
const KILL_POINTS: [&str; 9] = [
    "phase: schema",
    "app: CopySchema",
    "app: ProtectTarget",
    "app: CreateSlot",
    "app: CreateSubscription",
    "initial copy",
    // Its pg_restore outlives it, building: the next run ends that one before building.
    "indexes and constraints, ",
    "phase: catch_up",
    "cutover: fence",
];

#[tokio::test]
async fn killed_at_every_step_it_resumes_and_loses_nothing() {
    let lab = CliLab::start(15, 18).await;
    // Enough rows that the initial copy is still running when the process is killed.
    exec(
        &lab.pair.source,
        "app",
        "CREATE TABLE big (id bigserial PRIMARY KEY, payload text);
         INSERT INTO big (payload) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 400000) g;
         CREATE INDEX big_by_payload ON big (payload);",
    )
    .await;
    let load = Ledger::run(through(&lab.bouncer), LoadOptions::new(4));
    let args = lab.args("run", &[]);
    let mut guard_said = Vec::new();
    for point in KILL_POINTS {
        let mut run = lab.spawn(&args);
        run.wait_for(point, Duration::from_secs(120));
        run.kill();
        // Inside the cutover, the fence guard outlives the kill and releases the clients.
        guard_said.extend(run.rest(Duration::from_secs(10)));
    }
    let guard_said = guard_said.join("\n");
    assert!(
        guard_said.contains("ended inside the cutover") && guard_said.contains("clients released"),
        "the kill inside the fence was not handled by the fence guard:\n{guard_said}"
    );
    let finish = lab.output(&args);
    let said = String::from_utf8_lossy(&finish.stderr);
    assert!(finish.status.success(), "final run failed:\n{said}");
    assert!(String::from_utf8_lossy(&finish.stdout).contains("finished: window_open"));

    // The guard released the clients; nobody waited for the next run.
    nothing_lost(load, &lab.pair.target, Duration::from_secs(4)).await;
    assert!(paused_entries(&lab.bouncer).await.is_empty());
    // The build the kill interrupted was done again, once: the target has the source's indexes.
    assert_eq!(
        common::structures(&lab.pair.source, "app").await,
        common::structures(&lab.pair.target, "app").await
    );
}
