//! The ledger in direct mode: clients follow the writable server, count rejections, reconnect
//! after their sessions are ended or have reached their lifetime, and verification accounts
//! for every attempt.

use std::time::Duration;

use pgshift_lab::testing::require_binaries;
use pgshift_lab::{Ledger, LedgerTarget, LoadOptions, Outcome, PgServer, ServerOptions};

/// ALTER SYSTEM (its own statement: it cannot run in a transaction block) and reload.
async fn alter_system(client: &tokio_postgres::Client, change: &str) {
    client
        .batch_execute(&format!("ALTER SYSTEM {change}"))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

#[tokio::test]
async fn direct_clients_follow_the_writable_server() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let read_only = PgServer::start(
        ServerOptions::new(13, dir.path(), "old").setting("default_transaction_read_only", "on"),
    )
    .await
    .unwrap();
    let writable = PgServer::start(ServerOptions::new(16, dir.path(), "new"))
        .await
        .unwrap();
    assert_ne!(read_only.password(), writable.password());
    let client = writable.connect("postgres").await.unwrap();
    Ledger::install(&client, 10).await.unwrap();

    let target = LedgerTarget::read_write(&[&read_only, &writable], "postgres");
    let handle = Ledger::run(target, LoadOptions::new(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = handle.stop().await;

    assert!(report.committed > 0, "{:?}", report.errors);
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    let verification = Ledger::verify(&client, &report).await.unwrap();
    assert!(verification.is_ok(), "{verification:?}");
    assert_eq!(verification.found, report.committed);
}

#[tokio::test]
async fn fenced_server_rejects_writes_and_clients_reconnect_after_termination() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(17, dir.path(), "fenced"))
        .await
        .unwrap();
    server.create_database("app").await.unwrap();
    let admin = server.connect("app").await.unwrap();
    Ledger::install(&admin, 20).await.unwrap();
    // The admin session stays writable whatever the server default becomes.
    admin
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();

    let opts = LoadOptions {
        rate: Some(400.0),
        ..LoadOptions::new(4)
    };
    let handle = Ledger::run(LedgerTarget::server(&server, "app"), opts);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The direct-mode fence: read-only, then end every client session.
    alter_system(&admin, "SET default_transaction_read_only = on").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = 'app' AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    alter_system(&admin, "RESET default_transaction_read_only").await;
    let lifted = handle.snapshot().elapsed;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let report = handle.stop().await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    assert!(
        report.failed > 0,
        "no write was rejected: {:?}",
        report.errors
    );
    assert!(
        report
            .errors
            .iter()
            .any(|(m, _)| m.starts_with("failed: ERROR 25006")),
        "{:?}",
        report.errors
    );
    assert!(
        report
            .samples
            .iter()
            .any(|s| s.outcome == Outcome::Committed && Duration::from_micros(s.start_us) > lifted),
        "clients did not resume after the fence was lifted: {:?}",
        report.errors
    );
    assert!(report.longest_commit_gap_ms >= 500.0);

    let verification = Ledger::verify(&admin, &report).await.unwrap();
    println!("{}", serde_json::to_string(&verification).unwrap());
    assert!(verification.is_ok(), "{verification:?}");
    assert_eq!(verification.found, report.committed);
}

/// Sessions the server has seen in database `db` (pg_stat_database, 14 and later).
async fn sessions(client: &tokio_postgres::Client, db: &str) -> i64 {
    client
        .query_one(
            "SELECT sessions FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn clients_replace_connections_that_reach_their_lifetime() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(16, dir.path(), "lifetime"))
        .await
        .unwrap();
    server.create_database("app").await.unwrap();
    let admin = server.connect("app").await.unwrap();
    Ledger::install(&admin, 10).await.unwrap();
    let before = sessions(&admin, "app").await;

    let opts = LoadOptions {
        rate: Some(200.0),
        max_connection_lifetime: Some(Duration::from_millis(300)),
        ..LoadOptions::new(2)
    };
    let handle = Ledger::run(LedgerTarget::server(&server, "app"), opts);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = handle.stop().await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    // 2 s of 300 ms lifetimes: about 6 per client; asking for 3 each leaves room for a slow
    // machine.
    assert!(
        report.reconnects >= 6,
        "{} reconnects: {:?}",
        report.reconnects,
        report.errors
    );
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.in_doubt, 0, "{:?}", report.errors);
    assert_eq!(report.connect_failures, 0, "{:?}", report.errors);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The server saw every one of those connections: each client's first plus its reconnects.
    // A session is counted when its backend reports statistics, at the latest when it exits.
    let expected = 2 + report.reconnects as i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = sessions(&admin, "app").await - before;
        if seen >= expected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw {seen} sessions, the report says {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let verification = Ledger::verify(&admin, &report).await.unwrap();
    assert!(verification.is_ok(), "{verification:?}");
    assert_eq!(verification.found, report.committed);
}

/// A test that runs pgshift as a child process waits for it with a blocking call on the test's
/// own (single-threaded) runtime: the load must keep writing meanwhile, or the "under load"
/// cutover it checks happens with no writes at all.
#[tokio::test]
async fn the_load_keeps_writing_while_the_test_thread_blocks() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(18, dir.path(), "blocked"))
        .await
        .unwrap();
    let client = server.connect("postgres").await.unwrap();
    Ledger::install(&client, 10).await.unwrap();
    let handle = Ledger::run(
        LedgerTarget::server(&server, "postgres"),
        LoadOptions::new(2),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = handle.snapshot().committed;
    // What `Command::output()` does to the runtime while pgshift runs.
    std::thread::sleep(Duration::from_secs(2));
    let during = handle.snapshot().committed - before;
    let report = handle.stop().await;
    assert!(
        during > 0,
        "no commit while the test's thread was blocked for 2 s (before: {before}, after: {})",
        report.committed
    );
    let verification = Ledger::verify(&client, &report).await.unwrap();
    assert!(verification.is_ok(), "{verification:?}");
}
