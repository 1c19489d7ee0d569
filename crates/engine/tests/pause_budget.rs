//! The cutover's pause budget: when the target cannot apply within `max_pause` (a lock held on
//! a replicated table), the attempt aborts before the switch, writes resume on the source,
//! replication keeps running, and a later cutover succeeds.

mod common;

use std::time::{Duration, Instant};

use common::{checksums, exec, pair, plan};
use pgshift_engine::{events, CutoverMode, Error, Phase, Upgrade};

#[tokio::test]
async fn cutover_aborts_within_budget_and_succeeds_later() {
    let pair = pair(15, 18).await;
    pair.source.create_database("app").await.unwrap();
    exec(&pair.source, "app", "CREATE TABLE items (id serial PRIMARY KEY, n int); INSERT INTO items (n) SELECT g FROM generate_series(1, 100) g").await;

    let mut plan = plan(&pair, "app");
    plan.cutover = CutoverMode::Manual;
    plan.max_pause = Duration::from_millis(500);
    let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();
    assert_eq!(
        upgrade.run().await.unwrap().finished,
        Phase::ReadyForCutover
    );

    // Block apply on the target: hold a lock on the replicated table, then change it at the source.
    let blocker = pair.target.connect("app").await.unwrap();
    blocker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    exec(&pair.source, "app", "INSERT INTO items (n) VALUES (1000)").await;

    let started = Instant::now();
    let error = upgrade.cutover_now().await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(error, Error::CutoverAborted { .. }), "{error}");
    assert!(took < Duration::from_secs(5), "abort took {took:?}");

    // Clients resume on the source: it takes writes again, and replication is still there.
    exec(&pair.source, "app", "INSERT INTO items (n) VALUES (1001)").await;
    let status = upgrade.status().await.unwrap();
    assert_eq!(status.phase, Phase::ReadyForCutover, "{status:?}");
    assert!(!status.databases[0].database.source_read_only);

    blocker.batch_execute("ROLLBACK").await.unwrap();
    let report = upgrade.cutover_now().await.unwrap();
    assert!(report.pause_ms < 500.0 * 4.0);
    assert_eq!(
        checksums(&pair.source, "app").await,
        checksums(&pair.target, "app").await
    );
    exec(&pair.target, "app", "INSERT INTO items (n) VALUES (1002)").await;
}
