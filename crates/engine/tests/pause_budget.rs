//! The cutover's pause budget, under a live load through PgBouncer. A long transaction holds up
//! PAUSE past `max_pause`: the attempt aborts before the switch and clients resume on the source
//! without an error. A target that cannot apply (a lock held on a replicated table) is found by
//! the probe before any fence. Either way replication keeps running, and a later cutover succeeds
//! with nothing lost.

mod common;

use std::time::{Duration, Instant};

use common::{
    bouncer_for, ledger_database, pair, pgbouncer_traffic, plan, through, APP_PASSWORD, APP_USER,
};
use pgshift_engine::{events, CutoverMode, Error, Phase, Upgrade};
use pgshift_lab::ledger::{Ledger, LoadOptions};

#[tokio::test]
async fn slow_cutovers_abort_within_budget_and_a_later_one_succeeds() {
    let pair = pair(15, 18).await;
    ledger_database(&pair).await;
    let bouncer = bouncer_for(&pair).await;
    let load = Ledger::run(through(&bouncer), LoadOptions::new(4));

    let mut plan = plan(&pair, "app");
    plan.traffic = pgbouncer_traffic(&bouncer);
    plan.cutover = CutoverMode::Manual;
    plan.max_pause = Duration::from_millis(300);
    let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();
    assert_eq!(
        upgrade.run().await.unwrap().finished,
        Phase::ReadyForCutover
    );

    // 1. A transaction in flight for 3 s: PAUSE cannot finish within 300 ms.
    let long = tokio::spawn({
        let config = bouncer.client_config("app", APP_USER, APP_PASSWORD);
        async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            client
                .batch_execute("BEGIN; SELECT pg_sleep(3); COMMIT")
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let error = upgrade.cutover_now().await.unwrap_err();
    assert!(matches!(error, Error::CutoverAborted { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the abort waited for the long transaction"
    );
    long.await
        .unwrap()
        .expect("the long transaction commits on the source");
    let status = upgrade.status().await.unwrap();
    assert_eq!(
        status.phase,
        Phase::ReadyForCutover,
        "replication keeps running: {status:?}"
    );

    // 2. The target cannot apply: the probe before the fence finds it; nobody is paused.
    let blocker = pair.target.connect("app").await.unwrap();
    blocker
        .batch_execute("BEGIN; LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let paused_before = load.snapshot().committed;
    let error = upgrade.cutover_now().await.unwrap_err();
    assert!(
        load.snapshot().committed > paused_before,
        "clients kept committing"
    );
    assert!(
        error.to_string().contains("did not reach the target"),
        "{error}"
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();

    // 3. Nothing in the way: the cutover goes through.
    let report = upgrade.cutover_now().await.unwrap();
    assert_eq!(report.mode, "pgbouncer");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let workload = load.stop().await;
    let verification = Ledger::verify(&pair.target.connect("app").await.unwrap(), &workload)
        .await
        .unwrap();
    assert_eq!(
        workload.failed + workload.in_doubt,
        0,
        "{:?}",
        workload.errors
    );
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert!(verification.invariant_holds);
}
