//! Upgrades under a live write load (the ledger of DESIGN.md §6): through PgBouncer not one
//! client transaction fails; in direct mode the errors clients see are counted; in both, every
//! acknowledged commit is on the new server exactly once and the balances still add up.

mod common;

use std::time::Duration;

use common::{bouncer_for, ledger_database, pair, pgbouncer_traffic, plan, through};
use pgshift_engine::{events, Phase, Upgrade};
use pgshift_lab::ledger::{Ledger, LedgerTarget, LoadOptions};

const CLIENTS: usize = 8;

#[tokio::test]
async fn through_pgbouncer_no_transaction_fails_or_is_lost() {
    let pair = pair(15, 18).await;
    ledger_database(&pair).await;
    let bouncer = bouncer_for(&pair).await;
    let load = Ledger::run(through(&bouncer), LoadOptions::new(CLIENTS));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut plan = plan(&pair, "app");
    plan.traffic = pgbouncer_traffic(&bouncer);
    let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();
    let outcome = upgrade.run().await.unwrap();
    assert_eq!(outcome.finished, Phase::WindowOpen);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;

    let verification = Ledger::verify(&pair.target.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert!(report.committed > 100, "the load ran: {report:?}");
    assert_eq!(
        report.failed, 0,
        "client errors through PgBouncer: {:?}",
        report.errors
    );
    assert_eq!(report.in_doubt, 0, "{:?}", report.errors);
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert_eq!(verification.duplicated, 0, "{verification:?}");
    assert_eq!(verification.unexpected, 0, "{verification:?}");
    assert!(verification.invariant_holds, "{verification:?}");
    // The rollback window keeps the old server current: every acknowledged commit, those made
    // on the new server after the switch included, is there too (once the back stream applied
    // the last of them).
    common::caught_up(&pair.target, &pair.source, "app", "ledger_entries").await;
    let on_source = Ledger::verify(&pair.source.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert_eq!(on_source.lost, 0, "the source fell behind: {on_source:?}");
    assert_eq!(on_source.duplicated, 0, "{on_source:?}");
    assert!(on_source.invariant_holds, "{on_source:?}");
}

#[tokio::test]
async fn direct_mode_loses_nothing_and_counts_client_errors() {
    let pair = pair(15, 18).await;
    ledger_database(&pair).await;
    // Clients list both servers and take the one that accepts writes: pgshift keeps exactly one
    // writable at any moment.
    let load = Ledger::run(
        LedgerTarget::read_write(&[&pair.source, &pair.target], "app"),
        LoadOptions::new(CLIENTS),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut upgrade = Upgrade::connect(plan(&pair, "app"), events::discard())
        .await
        .unwrap();
    let outcome = upgrade.run().await.unwrap();
    assert_eq!(outcome.cutover.as_ref().unwrap().mode, "direct");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;

    let verification = Ledger::verify(&pair.target.connect("app").await.unwrap(), &report)
        .await
        .unwrap();
    assert_eq!(verification.lost, 0, "{verification:?}");
    assert_eq!(verification.duplicated, 0, "{verification:?}");
    assert_eq!(verification.unexpected, 0, "{verification:?}");
    assert!(verification.invariant_holds, "{verification:?}");
    // Ending the sessions is visible to clients, and the ledger reports it.
    let seen = report.failed + report.in_doubt + report.connect_failures;
    assert!(
        seen > 0,
        "direct mode ended sessions but no client error was counted: {report:?}"
    );
    assert!(
        !report.errors.is_empty(),
        "errors are listed with their messages: {report:?}"
    );
    let new_rows: i64 = pair
        .target
        .connect("app")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        new_rows as u64 >= report.committed,
        "writes continued on the new server"
    );
}

#[tokio::test]
async fn a_pgbouncer_entry_that_cannot_log_in_to_the_target_is_refused_before_the_fence() {
    let pair = pair(15, 18).await;
    ledger_database(&pair).await;
    // This entry logs in as the source's superuser, whose password the target does not share.
    let bouncer = pgshift_lab::PgBouncer::start(pgshift_lab::BouncerOptions::new(
        pair.dir.path().to_path_buf(),
        vec![pgshift_lab::BouncerDatabase::for_server(
            &pair.source,
            "app",
        )],
    ))
    .await
    .unwrap();
    let mut plan = plan(&pair, "app");
    plan.traffic = pgbouncer_traffic(&bouncer);
    let mut upgrade = Upgrade::connect(plan, events::discard()).await.unwrap();
    let error = upgrade.run().await.unwrap_err();
    let message = error.to_string();
    assert!(
        message
            .contains("entry app logs in as user \"postgres\", which cannot log in to the target"),
        "{message}"
    );
    assert!(
        !message.contains(pair.source.password()),
        "the password leaked: {message}"
    );
    // Nobody was paused and nothing switched: the source still serves through PgBouncer.
    let client = pgshift_lab::ledger::LedgerTarget::bouncer(
        &bouncer,
        "app",
        pair.source.superuser(),
        pair.source.password(),
    );
    let (client, connection) = client.configs()[0]
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(pair.source.port()));
    assert_ne!(upgrade.status().await.unwrap().phase, Phase::Done);
}
