//! A real PgBouncer in front of lab servers: the ledger through it, and the admin console
//! operations pgshift's cutover uses (PAUSE, RESUME, config rewrite + RELOAD).

use std::time::Duration;

use pgshift_lab::testing::require_binaries;
use pgshift_lab::{
    BouncerDatabase, BouncerOptions, Ledger, LedgerTarget, LoadOptions, PgBouncer, PgServer,
    ServerOptions,
};
use tokio_postgres::{Client, SimpleQueryMessage};

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn scalar(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.unwrap();
    rows(&messages)[0][0].clone().unwrap()
}

#[tokio::test]
async fn ledger_through_pgbouncer_commits_everything_and_loses_nothing() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let server = PgServer::start(ServerOptions::new(15, dir.path(), "blue"))
        .await
        .unwrap();
    server.create_database("app").await.unwrap();
    let direct = server.connect("app").await.unwrap();
    Ledger::install(&direct, 50).await.unwrap();
    // Idempotent.
    Ledger::install(&direct, 50).await.unwrap();

    let bouncer = PgBouncer::start(BouncerOptions::new(
        dir.path(),
        vec![BouncerDatabase::for_server(&server, "app")],
    ))
    .await
    .unwrap();

    let target = LedgerTarget::bouncer(&bouncer, "app", server.superuser(), server.password());
    let handle = Ledger::run(target, LoadOptions::new(4));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = handle.snapshot();
    let report = handle.stop().await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());

    assert!(live.committed > 0 && live.committed <= report.committed);
    assert!(report.committed > 100, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert_eq!(report.in_doubt, 0, "{:?}", report.errors);
    assert_eq!(report.connect_failures, 0, "{:?}", report.errors);
    assert_eq!(report.acknowledged.len() as u64, report.committed);
    assert_eq!(report.samples.len() as u64, report.committed);
    assert!(report.p50_ms <= report.p99_ms && report.p99_ms <= report.max_ms);

    assert_eq!(report.accounts, 50);
    let verification = Ledger::verify(&direct, &report).await.unwrap();
    println!("{}", serde_json::to_string(&verification).unwrap());
    assert_eq!(verification.expected, report.committed);
    assert_eq!(verification.found, report.committed);
    assert_eq!(verification.lost, 0);
    assert_eq!(verification.unexpected, 0);
    assert!(verification.invariant_holds);
    assert!(verification.balances_match_entries);
    assert!(verification.is_ok());
    bouncer.stop().await.unwrap();
}

#[tokio::test]
async fn admin_console_pauses_resumes_and_reloads_a_rewritten_config() {
    require_binaries();
    let dir = tempfile::tempdir().unwrap();
    let blue = PgServer::start(ServerOptions::new(14, dir.path(), "blue"))
        .await
        .unwrap();
    let green = PgServer::start(ServerOptions::new(18, dir.path(), "green"))
        .await
        .unwrap();
    let blue_entry = BouncerDatabase::for_server(&blue, "postgres").named("app");
    let bouncer = PgBouncer::start(BouncerOptions::new(dir.path(), vec![blue_entry.clone()]))
        .await
        .unwrap();
    assert_eq!(
        bouncer.admin_url(),
        format!(
            "postgres://pgshift_admin@127.0.0.1:{}/pgbouncer",
            bouncer.port()
        )
    );

    assert_eq!(bouncer.admin_user(), "pgshift_admin");
    let admin = bouncer.admin_connect().await.unwrap();
    let databases = rows(&admin.simple_query("SHOW DATABASES").await.unwrap());
    assert!(databases.iter().any(|row| row[0].as_deref() == Some("app")));

    let (client, connection) = bouncer
        .client_config("app", blue.superuser(), blue.password())
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(scalar(&client, "SHOW server_version").await, blue.version());

    // PAUSE holds queries until RESUME.
    admin.simple_query("PAUSE").await.unwrap();
    let held = tokio::spawn(async move {
        let version = scalar(&client, "SHOW server_version").await;
        (client, version)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "a query ran while PgBouncer was paused"
    );

    // Cutover: point `app` at green, RELOAD, RESUME; held queries run on green.
    let config = std::fs::read_to_string(bouncer.config_path()).unwrap();
    let blue_line = blue_entry.config_line().unwrap();
    let green_line = BouncerDatabase::for_server(&green, "postgres")
        .named("app")
        .config_line()
        .unwrap();
    assert!(config.contains(&blue_line));
    std::fs::write(
        bouncer.config_path(),
        config.replace(&blue_line, &green_line),
    )
    .unwrap();
    // Clients keep their PgBouncer login; the new entry carries green's credentials.
    admin.simple_query("RELOAD").await.unwrap();
    admin.simple_query("RESUME").await.unwrap();
    let (client, version) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(version, green.version());
    assert_eq!(
        scalar(&client, "SHOW server_version").await,
        green.version()
    );
    drop(client);
    drop(admin);
    bouncer.stop().await.unwrap();
}
